"""ZoomWorld scenes as tensors on the training device, and Qwen2.5-VL batches built there.

Training a 5M-parameter model, the step is not the model's arithmetic but everything around it:
rendering, the processor's per-image work, position ids computed sample by sample. Here the
scenes are rendered once, by a pool of workers, into uint8 pixel arrays of each view; prompts are
tokenized once per distinct question. A batch is then a gather on the device, a normalise, and
the processor's patchify (a reshape), with the 3D rotary position ids of a whole batch built in
one go: every image of a batch has the same size, so they are the same for every row.

What the model sees is exactly what `zoomless eval` feeds it (`render_view` for the pixels, the
chat template for the text); `tests/test_world_tensors.py` checks this against the processor.

Only Qwen2.5-VL-family layouts (one image, merge 2, temporal patch 2) are supported: this is the
ZoomWorld trainer for the tiny models, not a general data path.
"""

from __future__ import annotations

import multiprocessing
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from zoomless.imaging import render_view
from zoomless.prompts import format_question
from zoomless.sample import Sample
from zoomless.world.dimensions import DIMENSIONS
from zoomless.world.generate import plan_sample
from zoomless.world.locate import DIMENSION as LOCATE
from zoomless.world.locate import as_locate, is_locate
from zoomless.world.scene import render_scene_variants

FULL = "full"


def parse_view(view: str) -> tuple[float | None, int | None]:
    """(crop margin, panels drawn) of a view name: "full" -> (None, None), "full:2" -> the full
    scene with only its first 2 panels drawn (the evidence and one distractor panel), "crop" ->
    (0.25, None), "crop@1.5" -> (1.5, None): a zoom-out step, the panel plus 1.5 panel sizes each side."""
    if view == FULL:
        return None, None
    if view.startswith(FULL + ":") and view[len(FULL) + 1:].isdigit() and int(view[len(FULL) + 1:]) >= 1:
        return None, int(view[len(FULL) + 1:])
    if view == "crop":
        return 0.25, None
    if view.startswith("crop@"):
        try:
            margin = float(view[5:])
        except ValueError:
            margin = -1.0
        if margin >= 0:
            return margin, None
    raise ValueError(f"unknown view {view!r}: use 'full', 'full:<panels>' (e.g. full:2), 'crop' or "
                     "'crop@<margin>' (e.g. crop@1.5)")


def view_margin(view: str) -> float | None:
    """The crop margin of a view name (None for the full scene); see `parse_view`."""
    return parse_view(view)[0]


@dataclass(frozen=True)
class WorldSpec:
    """Which scenes: the arguments of `plan_sample` plus the pixel budget of every view."""

    split: str = "train"
    seed: int = 0
    size: int = 224
    min_area_fraction: float = 0.03
    max_area_fraction: float = 0.06
    frame_fraction: float = 0.05  # panel frame width / shorter panel side
    panels: tuple[int, int] = (4, 6)  # framed panels per scene: the evidence and distractor panels
    ocr: str = "strings"  # "words": OCR panels show one of a few words (dimensions.OCR_WORDS)
    locate_share: float = 0.0  # share of scenes that ask where the panel is (training aid, full views only)
    dimensions: tuple[str, ...] = DIMENSIONS
    max_pixels: int | None = None  # default: size * size

    @property
    def budget(self) -> int:
        return self.max_pixels or self.size * self.size

    def sample(self, index: int) -> tuple[Any, Sample]:
        scene, sample = plan_sample(
            index, split=self.split, seed=self.seed, size=self.size, dimensions=self.dimensions,
            min_area_fraction=self.min_area_fraction, max_area_fraction=self.max_area_fraction,
            frame_fraction=self.frame_fraction, panels=self.panels, ocr=self.ocr,
        )
        if is_locate(index, self.locate_share, self.seed):
            sample = as_locate(sample)
        return scene, sample


def render_views(
    spec: WorldSpec, index: int, views: Sequence[str], min_pixels: int = 56 * 56
) -> tuple[Sample, dict[str, np.ndarray]]:
    """One scene's record and the uint8 [h, w, 3] pixels of each view, as `zoomless eval` renders
    them and the processor then sizes them (a view under `min_pixels` is enlarged, as the Qwen2-VL
    processor does: same size rule, bicubic with antialias on the uint8 image)."""
    scene, sample = spec.sample(index)
    parsed = {view: parse_view(view) for view in views}
    images = render_scene_variants(scene, [panels for _, panels in parsed.values()])
    out = {}
    for view, (margin, panels) in parsed.items():
        if margin is not None and sample.meta.get("task") == LOCATE:
            continue  # a crop loses the place that a locate question asks for
        name = FULL if margin is None else "crop"
        pixels, _ = render_view(sample, name, images[panels], crop_margin=margin or 0.0, max_pixels=spec.budget)
        out[view] = _processor_size(np.asarray(pixels, dtype=np.uint8), min_pixels, spec.budget)
    return sample, out


def _processor_size(pixels: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = pixels.shape[:2]
    nh, nw = smart_resize(h, w, 28, min_pixels, max_pixels)
    if (nh, nw) == (h, w):
        return pixels
    t = resize(torch.from_numpy(np.ascontiguousarray(pixels).copy()).permute(2, 0, 1), [nh, nw], InterpolationMode.BICUBIC, antialias=True)
    return t.permute(1, 2, 0).contiguous().numpy()


def _render_job(job: tuple) -> tuple[Sample, dict[str, np.ndarray]]:
    return render_views(*job)


# ----------------------------------------------------------------------------- token layout


@dataclass
class PromptLayout:
    """A prompt as prefix + image pad tokens + suffix: the prefix (chat template up to the image)
    is the same for every prompt; the suffix (rest of the user turn, question, assistant header)
    depends only on the question text."""

    prefix: list[int]
    image_token_id: int
    suffixes: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_processor(cls, processor: Any) -> "PromptLayout":
        image_id = int(processor.tokenizer.convert_tokens_to_ids(processor.image_token))
        ids = _template_ids(processor, "?")
        cut = ids.index(image_id)
        layout = cls(ids[:cut], image_id)
        layout.suffixes["?"] = ids[cut + 1:]
        return layout

    def suffix(self, processor: Any, text: str) -> list[int]:
        if text not in self.suffixes:
            ids = _template_ids(processor, text)
            cut = ids.index(self.image_token_id)
            if ids[:cut] != self.prefix:
                raise ValueError("the chat template's text before the image depends on the question: unsupported")
            self.suffixes[text] = ids[cut + 1:]
        return self.suffixes[text]


def _template_ids(processor: Any, text: str) -> list[int]:
    from zoomless.engines.base import conversation
    from zoomless.models.loading import render_prompts

    from PIL import Image

    prompt = render_prompts(processor, [conversation([Image.new("RGB", (28, 28))], text)])[0]
    return processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- the data


@dataclass
class Bucket:
    """The samples of one view whose images share one size: uint8 pixels [n, h, w, 3] on the device."""

    view: str
    rows: Tensor  # [n] sample index of each image
    pixels: Tensor  # [n, h, w, 3] uint8

    @property
    def grid(self) -> tuple[int, int]:  # patches per side (h, w)
        return self.pixels.shape[1] // 14, self.pixels.shape[2] // 14


@dataclass
class WorldTensors:
    """N rendered scenes: records, per-view pixel buckets, tokenized questions and answers."""

    samples: list[Sample]
    buckets: dict[str, list[Bucket]]
    suffix: Tensor  # [N, T] suffix ids (question + assistant header), right-padded
    suffix_len: Tensor  # [N]
    answer: Tensor  # [N, A] answer ids + end of turn, right-padded with the pad id
    answer_len: Tensor  # [N]
    prefix: Tensor  # [p] template tokens before the image
    image_token_id: int
    pad_id: int
    eos_id: int
    banned: Tensor  # vision token ids: never to be generated (an image pad in a response breaks the forward)

    def locate(self, view: str) -> Tensor:
        """[N, 2]: (bucket number, position in that bucket) of every sample's image in `view`."""
        out = torch.empty((len(self), 2), dtype=torch.long, device=self.device)
        for k, bucket in enumerate(self.buckets[view]):
            out[bucket.rows, 0] = k
            out[bucket.rows, 1] = torch.arange(len(bucket.rows), device=self.device)
        return out

    @property
    def device(self) -> torch.device:
        return self.suffix.device

    def __len__(self) -> int:
        return len(self.samples)


class Cancelled(RuntimeError):
    """`build_world` was asked to stop."""


def build_world(
    spec: WorldSpec,
    n: int,
    views: Sequence[str],
    processor: Any,
    eos_id: int,
    *,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = True,
    form: str = "open",
    start: int = 0,
    stop: threading.Event | None = None,
) -> WorldTensors:
    """Render scenes start..start+n-1 of `spec` in every view (in `workers` processes) and tokenize
    them; row i of the result is scene start + i. Setting `stop` (from another thread) abandons the
    work with `Cancelled` and ends the worker processes at once."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    views = tuple(dict.fromkeys(views))
    for v in views:
        parse_view(v)  # bad view names fail before any work
    size = processor.image_processor.size
    min_pixels = int(size.get("shortest_edge", 56 * 56)) if isinstance(size, dict) else 56 * 56
    jobs = ((spec, start + i, views, min_pixels) for i in range(n))
    samples: list[Sample] = []
    by_shape: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[np.ndarray]]] = {}
    columns = (TextColumn(f"zoomworld {spec.split} -> tensors"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("render", total=n)
        pool = multiprocessing.get_context("fork").Pool(workers) if workers else None
        cancelled = False
        try:
            results = pool.imap(_render_job, jobs, chunksize=64) if pool else map(_render_job, jobs)
            for i, (sample, pixels) in enumerate(results):
                if stop is not None and stop.is_set():
                    cancelled = True
                    raise Cancelled(f"rendering {spec.split} scenes {start}..{start + n - 1} was stopped")
                samples.append(sample)
                for view, arr in pixels.items():
                    rows, arrays = by_shape.setdefault((view, arr.shape), ([], []))
                    rows.append(i)
                    arrays.append(arr)
                bar.advance(task)
        finally:
            if pool:
                pool.terminate() if cancelled else pool.close()
                pool.join()
    buckets: dict[str, list[Bucket]] = {v: [] for v in views}
    for (view, _), (rows, arrays) in sorted(by_shape.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        buckets[view].append(Bucket(view, torch.tensor(rows, device=device),
                                    torch.from_numpy(np.stack(arrays)).to(device)))
    return _with_tokens(samples, buckets, processor, eos_id, device, form)


def _pad_rows(rows: list[list[int]], pad: int, device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device), torch.tensor([len(r) for r in rows], device=device)


def _with_tokens(samples, buckets, processor, eos_id, device, form) -> WorldTensors:
    from zoomless.train.common import pad_id

    layout = PromptLayout.from_processor(processor)
    tok = processor.tokenizer
    suffixes = [layout.suffix(processor, format_question(s, None, form)) for s in samples]
    answers = [tok(s.answer or "", add_special_tokens=False)["input_ids"] + [eos_id] for s in samples]
    pad = pad_id(processor)
    suffix, suffix_len = _pad_rows(suffixes, pad, device)
    answer, answer_len = _pad_rows(answers, pad, device)
    from zoomless.models.loading import vision_token_ids

    return WorldTensors(samples, buckets, suffix, suffix_len, answer, answer_len,
                        torch.tensor(layout.prefix, device=device), layout.image_token_id, pad, eos_id,
                        torch.tensor(vision_token_ids(processor), dtype=torch.long, device=device))


# ----------------------------------------------------------------------------- batches


def patchify(pixels: Tensor, mean: Sequence[float], std: Sequence[float], patch: int = 14, merge: int = 2,
             temporal: int = 2) -> Tensor:
    """uint8 [B, h, w, 3] -> pixel_values [B * gh * gw, 3 * temporal * patch * patch], in the Qwen2-VL
    processor's order: patches of one 2x2 merge group are consecutive, groups in row-major order."""
    b, h, w, c = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - x.new_tensor(mean).view(1, c, 1, 1)) / x.new_tensor(std).view(1, c, 1, 1)
    x = x.unsqueeze(1).expand(b, temporal, c, h, w)  # a still image is `temporal` equal frames
    x = x.reshape(b, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # b, gh/m, gw/m, m, m, c, t, p, p
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def image_positions(prefix_len: int, grid: tuple[int, int], text_len: int, merge: int = 2) -> Tensor:
    """3D rotary position ids [3, L] of prefix + one image (grid in patches) + text_len tokens, as
    Qwen2.5-VL's `get_rope_index` builds them for a still image: text runs on one counter for all
    three axes; the image's tokens sit at (start, start + row, start + col); the text after it
    resumes at start + max(rows, cols)."""
    gh, gw = grid[0] // merge, grid[1] // merge
    pre = torch.arange(prefix_len).expand(3, -1)
    rows = torch.arange(gh).view(gh, 1).expand(gh, gw).reshape(-1)
    cols = torch.arange(gw).view(1, gw).expand(gh, gw).reshape(-1)
    img = torch.stack([torch.zeros_like(rows), rows, cols]) + prefix_len
    after = torch.arange(text_len).expand(3, -1) + prefix_len + max(gh, gw)
    return torch.cat([pre, img, after], dim=1)


@dataclass
class Batch:
    """Model inputs of one batch and where each row's answer sits."""

    inputs: dict[str, Tensor]
    rows: Tensor  # [B] sample indices
    answer_start: Tensor  # [B] position of the first answer token (its logits sit one before)
    lengths: Tensor  # [B] real length of each row


def make_batch(data: WorldTensors, bucket: Bucket, picks: Tensor, image_stats: tuple, with_answer: bool = True,
               responses: Tensor | None = None, response_len: Tensor | None = None) -> Batch:
    """The batch of bucket items `picks`: prompt, then (with_answer) the gold answer or the given
    `responses` [B, R] with lengths; right-padded."""
    dev = data.device
    rows = bucket.rows[picks]
    gh, gw = bucket.grid
    n_img = gh * gw // 4
    b = len(picks)
    suffix_w = int(data.suffix_len[rows].max())
    suffix = data.suffix[rows, :suffix_w]
    if responses is None and with_answer:
        responses, response_len = data.answer[rows], data.answer_len[rows]
    tail_w = 0 if responses is None else int(response_len.max())
    p = len(data.prefix)
    prompt_len = p + n_img + data.suffix_len[rows]  # [B]
    width = p + n_img + suffix_w + tail_w
    ids = torch.full((b, width), data.pad_id, dtype=torch.long, device=dev)
    ids[:, :p] = data.prefix
    ids[:, p:p + n_img] = data.image_token_id
    col = torch.arange(width, device=dev).view(1, -1)
    # suffix then response, each row's response right after its own suffix
    s_idx = (col - (p + n_img)).expand(b, -1)
    in_suffix = (s_idx >= 0) & (s_idx < data.suffix_len[rows].view(-1, 1))
    ids = torch.where(in_suffix, suffix.gather(1, s_idx.clamp(0, suffix_w - 1)), ids)
    lengths = prompt_len.clone()
    if responses is not None:
        r_idx = col - prompt_len.view(-1, 1)  # [B, width]
        in_resp = (r_idx >= 0) & (r_idx < response_len.view(-1, 1))
        ids = torch.where(in_resp, responses.gather(1, r_idx.clamp(0, responses.shape[1] - 1)), ids)
        lengths = prompt_len + response_len
    mask = (col < lengths.view(-1, 1)).long()
    pos = image_positions(p, bucket.grid, width - p - n_img).to(dev)
    mean, std = image_stats
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos.unsqueeze(1).expand(3, b, width),
        "pixel_values": patchify(bucket.pixels[picks], mean, std),
        "image_grid_thw": torch.tensor([[1, gh, gw]], device=dev).expand(b, 3),
    }
    return Batch(inputs, rows, prompt_len, lengths)


def image_stats(processor: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    ip = processor.image_processor
    if getattr(ip, "patch_size", 14) != 14 or getattr(ip, "merge_size", 2) != 2 or getattr(ip, "temporal_patch_size", 2) != 2:
        raise ValueError("ZoomWorld tensors support the Qwen2.5-VL layout only (patch 14, merge 2, temporal 2)")
    return tuple(ip.image_mean), tuple(ip.image_std)
