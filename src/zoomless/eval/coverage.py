"""Attention coverage: how much of the model's visual attention lands on the evidence box.

    result = coverage(samples, model, processor, out_dir="runs/coverage")

For one sample: the prompt (image + question + the assistant generation prompt) goes through the
model once. A forward pre-hook on ONE decoder layer's self-attention captures its inputs (hidden
states, rotary cos/sin, mask) and recomputes, with the module's own q_proj/k_proj (and q_norm/
k_norm for Qwen3-VL), its own rotary function (M-RoPE cos/sin come in already combined), GQA head
repeat and scaling, the attention of the LAST prompt token over all keys. Then the forward pass is
stopped: no eager attention for the whole model, no attention maps of other layers, no layers
after the chosen one. Heads are averaged.

The image tokens are the `<|image_pad|>` positions; their attention is reshaped to the merged
grid (image_grid_thw[1] / merge, image_grid_thw[2] / merge), row-major as the merger emits them.

Box to cells (better than floor + inclusive slice, which over-counts a row and a column): the box
is mapped to fractional grid coordinates (x / W * grid_w ...), and each cell is weighted by the
fraction of its area the box covers. With attention taken as uniform inside a cell,
    share    = sum(weights * attention) / sum(attention over image tokens)
    relative = share / (box area / image area)
relative = 1 means the box gets the attention its size deserves; > 1 that the model looks at it
more. Every resize between the original image and the grid (budget, processor) scales the whole
image, so the box fractions carry over exactly.

Layer: `layer` (an index, negative counts from the end) or round(relative_depth * (L - 1)), among
the L decoder layers with softmax attention: all of a Qwen-VL's, the full-attention quarter of
Qwen3.5's (its linear-attention layers have no attention map). The output gate of Qwen3.5's
attention acts after the softmax, so the attention is computed as for Qwen3-VL.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from zoomless.engines.base import conversation
from zoomless.imaging import crop_view, load_image, render_view
from zoomless.prompts import format_question
from zoomless.eval.runfiles import SETTINGS, check_settings, read_records
from zoomless.sample import Sample

ITEMS = "coverage.jsonl"
RESULTS = "results.json"
HEATMAPS = "heatmaps"
KIND = "coverage"
VIEWS = ("full", "overlay", "crop", "zoom")
_RESUME_KEYS = ("kind", "model", "layer", "view", "form", "max_pixels", "crop_margin")

# ----------------------------------------------------------------------------- the hooked layer


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers that have softmax self-attention (`self_attn`): every
    layer of a Qwen-VL (or of any model laid out the same way); Qwen3.5's full-attention layers,
    one in four (the others are linear attention, which has no attention map)."""
    for path in ("model.language_model.layers", "language_model.layers", "model.layers"):
        obj: Any = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if isinstance(obj, nn.ModuleList):
            layers = [m for m in obj if hasattr(m, "self_attn")]
            if layers:
                return layers
    raise ValueError(f"{type(model).__name__}: no language-model decoder layers with 'self_attn' found")


def resolve_layer(n_layers: int, layer: int | None = None, relative_depth: float = 0.5) -> int:
    """The layer index: `layer` as given (negative from the end), else round(relative_depth * (L - 1))."""
    if layer is not None:
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {n_layers} layers")
        return layer % n_layers
    if not 0.0 <= relative_depth <= 1.0:
        raise ValueError(f"relative_depth must be in [0, 1], got {relative_depth}")
    return int(math.floor(relative_depth * (n_layers - 1) + 0.5))


class _Captured(Exception):
    """Raised by the hook to stop the forward pass once the chosen layer's inputs are seen."""


def _repeat_kv(k: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, kv_heads, n, d) -> (b, kv_heads * groups, n, d), each kv head repeated for its query group."""
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _mask_row(mask: torch.Tensor | None, n_keys: int) -> torch.Tensor | None:
    """The additive mask (b, 1, 1, n) of the last query from any mask form transformers passes."""
    if mask is None:
        return None
    if mask.ndim == 2:  # (b, n) padding mask, 1 = keep (flash-attention style)
        row = mask[:, None, None, :]
    else:  # (b, 1 or heads, q, n)
        row = mask[:, :, -1:, :]
    row = row[..., -n_keys:]
    if row.dtype == torch.bool or not row.is_floating_point():
        return torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill(~row.bool(), float("-inf"))
    return row.float()


def _last_query_attention(attn: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """Softmax attention (b, heads, n) of the last position, as `attn` computes it in eager mode."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cos, sin = kwargs["position_embeddings"]
    b, n, _ = hidden.shape
    d = attn.head_dim
    q = attn.q_proj(hidden[:, -1:])
    if q.shape[-1] == 2 * attn.o_proj.in_features:  # Qwen3.5: each head's query, then its output gate
        q = q.view(b, 1, -1, 2 * d)[..., :d]
    q = q.reshape(b, 1, -1, d)
    k = attn.k_proj(hidden).view(b, n, -1, d)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head before the rotary embedding
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the module's own rotary function
    q = rotate(q, q, cos[:, -1:], sin[:, -1:])[0]
    k = rotate(k, k, cos, sin)[0]
    k = _repeat_kv(k, attn.num_key_value_groups)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scaling  # (b, h, 1, n)
    mask = _mask_row(kwargs.get("attention_mask"), n)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1)[:, :, 0, :]


@torch.inference_mode()
def last_token_attention(model: nn.Module, inputs: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """Attention (batch, heads, seq) of the last prompt token at decoder `layer`, from one
    truncated forward pass. `inputs` are the processor's outputs, already on the model's device."""
    attn = attention_layers(model)[layer].self_attn
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured["attention"] = _last_query_attention(module, args, kwargs)
        raise _Captured

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "attention" not in captured:
        raise RuntimeError(f"layer {layer}'s self-attention was never called in the forward pass")
    return captured["attention"]


# ----------------------------------------------------------------------------- grid and box


def image_token_span(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Positions of the image tokens in a single prompt (1-D input ids)."""
    token_id = getattr(model.config, "image_token_id", None)
    if token_id is None:
        raise ValueError(f"{type(model).__name__}: the config has no image_token_id")
    return (input_ids == token_id).nonzero().flatten()


def merged_grid(model: nn.Module, grid_thw: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of merged image tokens for one image's (t, h, w) patch grid."""
    merge = model.config.vision_config.spatial_merge_size
    t, h, w = (int(v) for v in grid_thw)
    if t != 1:
        raise ValueError(f"coverage works on still images; got a temporal grid of {t}")
    return h // merge, w // merge


def cell_weights(box_frac: Sequence[float], rows: int, cols: int) -> np.ndarray:
    """(rows, cols) weights: the fraction of each cell's area that the box covers. The box is in
    fractions of the image (x1, y1, x2, y2 in [0, 1]); sum(weights) / (rows * cols) = box area."""
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box_frac)

    def axis(lo: float, hi: float, n: int) -> np.ndarray:
        edges = np.arange(n + 1) / n
        return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None) * n

    return np.outer(axis(y1, y2, rows), axis(x1, x2, cols))


def box_fraction(sample: Sample, view: str, full: Any, crop_margin: float) -> tuple[float, ...]:
    """The evidence box as fractions of the image the model sees in `view` (`full`: the loaded image)."""
    w, h = full.size
    x1, y1, x2, y2 = sample.box  # type: ignore[misc]
    if view in ("full", "overlay"):
        return (x1 / w, y1 / h, x2 / w, y2 / h)
    # crop and zoom show the crop rectangle (zoom enlarges it as a whole)
    _, (rx1, ry1, rx2, ry2) = crop_view(full, sample.box, margin=crop_margin)
    rw, rh = rx2 - rx1, ry2 - ry1
    return ((x1 - rx1) / rw, (y1 - ry1) / rh, (x2 - rx1) / rw, (y2 - ry1) / rh)


# ----------------------------------------------------------------------------- per sample


@dataclass
class CoverageItem:
    id: str
    dimension: str | None
    layer: int
    grid: list[int] = field(default_factory=list)  # merged rows, cols
    box_area: float | None = None  # box area / image area
    share: float | None = None  # attention inside the box / attention on image tokens
    relative: float | None = None  # share / box_area
    image_mass: float | None = None  # attention on image tokens / all attention of the last token
    error: str | None = None


def sample_coverage(
    sample: Sample, model: nn.Module, processor: Any, layer: int, *, view: str = "full", form: str = "mcq",
    max_pixels: int | None = None, crop_margin: float = 0.25,
) -> tuple[CoverageItem, dict[str, Any]]:
    """Coverage of one sample and what a heatmap needs (the image seen, the grid, the box)."""
    from zoomless.models.loading import encode_conversations  # transformers: only when a model runs

    if sample.box is None:
        raise ValueError(f"sample {sample.id!r} has no evidence box")
    full = load_image(sample.image, name=sample.id)
    image, text = render_view(sample, view, image=full, crop_margin=crop_margin, max_pixels=max_pixels)
    conv = conversation([image], format_question(sample, text, form))
    device = next(model.parameters()).device
    inputs = encode_conversations(processor, [conv]).to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    att = last_token_attention(model, dict(inputs), layer)[0].mean(0)  # heads averaged -> (seq,)
    span = image_token_span(model, inputs["input_ids"][0])
    rows, cols = merged_grid(model, inputs["image_grid_thw"][0].tolist())
    if span.numel() != rows * cols:
        raise ValueError(f"sample {sample.id!r}: {span.numel()} image tokens for a {rows}x{cols} grid")
    grid = att[span].reshape(rows, cols).double().cpu().numpy()
    frac = box_fraction(sample, view, full, crop_margin)
    weights = cell_weights(frac, rows, cols)
    total = float(grid.sum())
    area = float(weights.sum()) / (rows * cols)
    share = float((grid * weights).sum()) / total if total > 0 else float("nan")
    item = CoverageItem(
        sample.id, sample.dimension, layer, [rows, cols], area, share,
        share / area if area > 0 else float("nan"), total,
    )
    return item, {"image": image, "grid": grid, "box_frac": frac}


def heatmap(image: Any, grid: np.ndarray, box_frac: Sequence[float], out_png: str | Path, title: str = "") -> Path:
    """The image with the attention grid over it (one colour cell per token) and the box in red."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    w, h = image.size
    fig = Figure(figsize=(5, 5 * h / w + 0.6))
    ax = fig.add_subplot()
    ax.imshow(np.asarray(image), extent=(0, w, h, 0))
    shown = ax.imshow(grid, extent=(0, w, h, 0), cmap="viridis", alpha=0.55, interpolation="nearest")
    x1, y1, x2, y2 = box_frac
    ax.add_patch(Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.axis("off")
    ax.set_title(title, fontsize=8)
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, shrink=0.8, format="%.3g")
    bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


# ----------------------------------------------------------------------------- summary


def _stats(xs: list[float]) -> dict[str, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"n": len(xs), "mean": statistics.fmean(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarize(items: Sequence[CoverageItem]) -> dict[str, Any]:
    """share and relative coverage (mean, median, range) over all items and per dimension."""
    ok = [it for it in items if it.error is None]
    groups: dict[str, list[CoverageItem]] = {}
    for it in ok:
        groups.setdefault(it.dimension or "other", []).append(it)
    out: dict[str, Any] = {"n": len(items), "failed": len(items) - len(ok)}
    for name, group in [("all", ok)] + sorted(groups.items()):
        entry = {"share": _stats([it.share for it in group]), "relative": _stats([it.relative for it in group]),
                 "box_area": _stats([it.box_area for it in group])}
        if name == "all":
            out.update(entry)
        else:
            out.setdefault("by_dimension", {})[name] = entry
    out.setdefault("by_dimension", {})
    return out


@dataclass
class CoverageResult:
    settings: dict[str, Any]
    items: list[CoverageItem]

    def summary(self) -> dict[str, Any]:
        return summarize(self.items)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "settings": self.settings, "summary": self.summary()}


# ----------------------------------------------------------------------------- entry points


def _safe_name(sample_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", sample_id)[:100] or "sample"


def _read_items(path: Path) -> dict[str, CoverageItem]:
    return {i.id: i for i in read_records(path, CoverageItem, "coverage")}


def coverage(
    samples: Iterable[Sample],
    model: nn.Module,
    processor: Any,
    *,
    layer: int | None = None,
    relative_depth: float = 0.5,
    view: str = "full",
    max_pixels: int | None = None,
    out_dir: str | Path | None = None,
    heatmaps: int = 8,
    form: str = "mcq",
    crop_margin: float = 0.25,
    model_name: str | None = None,
    progress: bool = True,
) -> CoverageResult:
    """Attention coverage of every sample with a box. With `out_dir`: coverage.jsonl (one line per
    sample, resumable), settings.json, results.json (summary) and heatmaps/ for the first
    `heatmaps` samples computed in this run. Samples without a box or whose image fails are
    recorded with an error and left out of the statistics."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if view not in VIEWS:
        raise ValueError(f"coverage view must be one of {', '.join(VIEWS)}, got {view!r}")
    samples = list(samples)
    n_layers = len(attention_layers(model))
    index = resolve_layer(n_layers, layer, relative_depth)
    settings = {
        "kind": KIND,
        "model": model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        "layer": index,
        "n_layers": n_layers,
        "relative_depth": index / max(n_layers - 1, 1),
        "view": view,
        "form": form,
        "max_pixels": max_pixels,
        "crop_margin": crop_margin,
        "n_samples": len(samples),
    }
    done: dict[str, CoverageItem] = {}
    out = Path(out_dir) if out_dir is not None else None
    items_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out, settings, _RESUME_KEYS)
        done = _read_items(out / ITEMS)
        items_file = (out / ITEMS).open("a")
    drawn = 0
    bar = Progress(TextColumn("[bold]coverage"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress)
    try:
        with bar:
            task = bar.add_task("coverage", total=len(samples))
            for s in samples:
                if s.id not in done:
                    try:
                        item, seen = sample_coverage(s, model, processor, index, view=view, form=form,
                                                     max_pixels=max_pixels, crop_margin=crop_margin)
                    except Exception as e:  # noqa: BLE001 - one bad sample is one failed item, never a crash
                        item, seen = CoverageItem(s.id, s.dimension, index, error=" ".join(str(e).split())), None
                    if seen is not None and out is not None and drawn < heatmaps:
                        title = f"{s.id}: layer {index}, share {item.share:.2f}, relative {item.relative:.2f}"
                        png = out / HEATMAPS / f"{_safe_name(s.id)}.png"
                        heatmap(seen["image"], seen["grid"], seen["box_frac"], png, title)
                        drawn += 1
                    done[s.id] = item
                    if items_file is not None:
                        items_file.write(json.dumps(asdict(item)) + "\n")
                        items_file.flush()
                bar.advance(task)
    finally:
        if items_file is not None:
            items_file.close()
    result = CoverageResult(settings, [done[s.id] for s in samples])
    if out is not None:
        (out / RESULTS).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def coverage_file(
    path: str | Path, model_dir: str | Path, out_dir: str | Path | None = None, *, limit: int | None = None,
    device: str = "auto", dtype: str = "auto", **kw: Any,
) -> CoverageResult:
    """The CLI entry point (`zoomless coverage`): load a benchmark file and a local model directory,
    keep the first `limit` samples, run `coverage`; keyword arguments go to it."""
    from zoomless.eval.generic import load_benchmark
    from zoomless.models.loading import load_vlm

    samples = load_benchmark(path)
    if limit is not None:
        samples = samples[:limit]
    model, processor = load_vlm(model_dir, device=device, dtype=dtype)
    kw.setdefault("model_name", Path(model_dir).resolve().name)
    return coverage(samples, model, processor, out_dir=out_dir, **kw)


def load_coverage(out_dir: str | Path) -> CoverageResult:
    """A CoverageResult rebuilt from a coverage folder (settings.json + coverage.jsonl)."""
    out = Path(out_dir)
    path = out / SETTINGS
    settings = json.loads(path.read_text()) if path.exists() else {}
    if settings.get("kind") != KIND:
        raise ValueError(f"{out}: not a coverage folder (no {SETTINGS} with kind {KIND!r})")
    return CoverageResult(settings, list(_read_items(out / ITEMS).values()))
