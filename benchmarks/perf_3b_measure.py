"""What perf_3b.py counts and how it reads a profile: model FLOPs and decode bytes of a Qwen2.5-VL
or Qwen3-VL config, and a summary of one torch.profiler run.

What one forward of one sequence costs (multiply-adds count 2 FLOPs):
- language model: 2 x (decoder matmul weights: q, k, v, o, gate, up, down) per token, over every
  token of the sequence (image tokens included, padding not); causal attention 2 x S^2 x (heads x
  head_dim) per layer (QK^T and AV, half the square each); the LM head 2 x hidden x vocab only where
  logits are needed (the response positions: zoomless never forms the others). Qwen3's heads x
  head_dim differs from its hidden size (4B: 32 x 128 against 2,560): q and o count heads x head_dim.
- vision tower: 2 x (patch embedding + block matmul weights) per patch, plus each patch merger's MLP
  per merged token; attention 4 x L^2 x hidden per block over each attended segment.
  Qwen2.5-VL: gated MLP (gate, up, down: 3 x hidden x intermediate); attention over the 112 px
  windows in windowed blocks, over the whole image in `fullatt_block_indexes` blocks; one merger.
  Qwen3-VL: plain MLP (fc1, fc2: 2 x hidden x intermediate); every block attends over the whole
  image; the merger plus one "deepstack" merger per `deepstack_visual_indexes` block (same shape;
  their outputs are added to the first decoder layers' image positions, an addition).
Norms (Qwen3's q/k norms too), rotary embeddings, Qwen3-VL's interpolated position embeddings,
activations and softmaxes are left out (a few percent at these shapes).
A training step counts 3 forwards (forward + backward) for what is trained and 1 for what only runs
forward (the teacher, a frozen tower). The vision tower counts once per distinct image of the
student's batch and once per distinct image of the teacher's where the step shares images
(zoomless.train.shared_images: the rollouts of one prompt share its image), once per sequence
where it does not (stock transformers). Work the hardware does beyond that is counted apart, as
HFU, not as model FLOPs (MFU): activation-checkpoint recompute, and an image encoded again in each
micro-batch that holds rollouts of its prompt.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class Seq:
    """One teacher-forced sequence, as the step runs it."""

    tokens: int  # prompt (with its image tokens) + response, no padding
    head_tokens: int  # positions whose logits are computed (the response)
    grids: list[tuple[int, int, int]] = field(default_factory=list)  # image_grid_thw of its images
    image_owner: int | None = None  # sequences of one owner (the rollouts of one prompt) share their images


def _text_dims(config: Any) -> dict[str, int]:
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return dict(h=t.hidden_size, layers=t.num_hidden_layers, q=t.num_attention_heads * head_dim,
                kv=t.num_key_value_heads * head_dim, inter=t.intermediate_size, vocab=t.vocab_size)


def decoder_matmul_params(config: Any) -> int:
    """Weights of the decoder layers' matmuls (q, k, v, o, gate, up, down), all layers."""
    d = _text_dims(config)
    per_layer = d["h"] * d["q"] + 2 * d["h"] * d["kv"] + d["q"] * d["h"] + 3 * d["h"] * d["inter"]
    return per_layer * d["layers"]


def windowed(config: Any) -> bool:
    """Whether the vision tower attends within windows in some blocks (Qwen2.5-VL), not over the
    whole image in all of them (Qwen3-VL)."""
    return config.model_type == "qwen2_5_vl"


def vision_segments(grid: tuple[int, int, int], v: Any) -> tuple[list[int], list[int]]:
    """Attention segment lengths (patches) of one image: its windows, and the whole image."""
    t, h, w = grid
    m = v.spatial_merge_size
    ws = v.window_size // m // v.patch_size  # window side in merged tokens
    rows, cols = h // m, w // m
    windows = [min(ws, rows - i) * min(ws, cols - j) * m * m for i in range(0, rows, ws) for j in range(0, cols, ws)]
    return windows * t, [h * w] * t


def vision_forward(config: Any, grid: tuple[int, int, int]) -> dict[str, float]:
    """FLOPs of the vision tower on one image (its attention is bidirectional)."""
    v = config.vision_config
    t, h, w = grid
    patches = t * h * w
    d, inter, m2 = v.hidden_size, v.intermediate_size, v.spatial_merge_size**2
    embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * d
    if windowed(config):
        block = 4 * d * d + 3 * d * inter  # qkv, proj, gate/up/down
        windows, full = vision_segments(grid, v)
        full_blocks = len(v.fullatt_block_indexes)
        square = full_blocks * sum(n * n for n in full) + (v.depth - full_blocks) * sum(n * n for n in windows)
        mergers = 1
    else:
        block = 4 * d * d + 2 * d * inter  # qkv, proj, fc1/fc2
        square = v.depth * t * (h * w) ** 2  # each frame attends over itself
        mergers = 1 + len(v.deepstack_visual_indexes)
    merger = (d * m2) ** 2 + d * m2 * v.out_hidden_size
    return {"vision_linear": 2.0 * patches * (embed + v.depth * block) + 2.0 * patches / m2 * mergers * merger,
            "vision_attention": 4.0 * d * square}


def lm_forward(config: Any, tokens: int, head_tokens: int, causal: bool = True) -> dict[str, float]:
    d = _text_dims(config)
    attn = (2.0 if causal else 4.0) * tokens * tokens * d["q"] * d["layers"]
    return {"lm_linear": 2.0 * tokens * decoder_matmul_params(config), "lm_attention": attn,
            "lm_head": 2.0 * head_tokens * d["h"] * d["vocab"]}


def forward_flops(config: Any, seq: Seq, causal: bool = True) -> dict[str, float]:
    """FLOPs of one forward of `seq`, by part."""
    out = lm_forward(config, seq.tokens, seq.head_tokens, causal)
    out.update(vision_linear=0.0, vision_attention=0.0)
    for grid in seq.grids:
        for k, x in vision_forward(config, grid).items():
            out[k] += x
    return out


def encodes_images(seqs: Sequence[Seq], group: int) -> list[bool]:
    """Whether the vision tower encodes each sequence's images when each distinct image is encoded
    once per forward of `group` consecutive sequences (1: every sequence's images)."""
    out: list[bool] = []
    seen: set[int] = set()
    for i, s in enumerate(seqs):
        if i % group == 0:
            seen = set()
        out.append(s.image_owner is None or s.image_owner not in seen)
        if s.image_owner is not None:
            seen.add(s.image_owner)
    return out


def step_flops(
    config: Any, trained: Sequence[Seq], forward_only: Sequence[Seq] = (), *, vision_trained: bool = True,
    checkpointing: float = 0.0, shared_images: bool = False, micro: int | None = None,
    checkpoint_vision: bool = True,
) -> dict[str, float]:
    """Model FLOPs of one step (`model`) and its split by part, and what the hardware does besides
    (`recompute`): the activation-checkpoint recompute (one more forward of the trained layers,
    head excluded; `checkpointing` is the share of decoder layers checkpointed, True for all; the
    vision blocks with it unless `checkpoint_vision` is False) and,
    with `shared_images`, the images encoded again because the rollouts of one prompt span several
    forwards of `micro` sequences. With `shared_images` the model FLOPs count
    the vision tower once per distinct image of each list (`trained`, `forward_only`); without,
    once per sequence, as stock transformers runs it."""
    parts = dict.fromkeys(("lm_linear", "lm_attention", "lm_head", "vision_linear", "vision_attention"), 0.0)
    recompute = 0.0
    for seqs, grad in ((trained, True), (forward_only, False)):
        lm, vis = (3.0, 3.0 if vision_trained else 1.0) if grad else (1.0, 1.0)
        whole = max(len(seqs), 1)
        needed = encodes_images(seqs, whole if shared_images else 1)
        done = encodes_images(seqs, (micro or whole) if shared_images else 1)
        for s, n, d in zip(seqs, needed, done):
            f = forward_flops(config, s)
            vision = f["vision_linear"] + f["vision_attention"]
            for k in parts:
                parts[k] += (vis * n if k.startswith("vision") else lm) * f[k]
            recompute += vis * vision * (d - n)
            if checkpointing and grad:
                recompute += checkpointing * (f["lm_linear"] + f["lm_attention"]) + (vision * d if vision_trained and checkpoint_vision else 0.0)
    return {"model": sum(parts.values()), "recompute": recompute, "parts": parts}


def decode_bytes(model: Any) -> int:
    """Bytes of weights one decode step reads: every language-model weight, with the LM head read
    whole and the input embedding only by lookup (free); the vision tower does not run."""
    lm = model.model.language_model
    embed = lm.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    weights = {id(p): p for p in lm.parameters() if p is not embed}
    weights[id(head)] = head
    return sum(p.numel() * p.element_size() for p in weights.values())


def kv_bytes_per_step(config: Any, batch: int, context: float, bytes_per_value: int = 2) -> float:
    """KV-cache bytes one decode step reads: every layer's keys and values of `context` tokens per row."""
    d = _text_dims(config)
    return batch * context * d["layers"] * 2 * d["kv"] * bytes_per_value


# ----------------------------------------------------------------------------- profiles

CATEGORIES = (  # GPU kernel-name substrings, first match wins
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "conv")),
    ("optimizer (foreach/fused)", ("foreach", "multi_tensor", "adam")),
    ("loss: topk/sort/softmax", ("topk", "sort", "softmax", "logsumexp", "gather", "scatter")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "fill")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "unrolled", "vectorized")),
)
LAUNCH_QUEUE_FULL = "Command Buffer Full"  # a CUPTI marker, not a kernel: the GPU was the one behind


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


@contextlib.contextmanager
def module_ranges(modules: dict[str, nn.Module]) -> Iterator[None]:
    """A profiler range around every call of each module's forward."""
    from torch.autograd.profiler import record_function

    handles, open_ranges = [], {}

    def pre(name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            rf = record_function(name)
            rf.__enter__()
            open_ranges.setdefault(name, []).append(rf)
        return hook

    def post(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            open_ranges[name].pop().__exit__(None, None, None)
        return hook

    for name, m in modules.items():
        handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profile_call(fn: Callable[[], Any], ranges: dict[str, nn.Module] | None = None, top: int = 15) -> dict[str, Any]:
    """One call of `fn` under torch.profiler: the top ops by self device time and by self CPU time,
    the top GPU kernels, kernel time by category, the share of the wall time the GPU was busy, and
    the device time inside each of `ranges` (forward calls of those modules; backward not included)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with module_ranges(ranges or {}), profile(activities=acts) as prof:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    gaps = guarded_gaps(prof) if cuda else None
    events = prof.key_averages()
    ops = [e for e in events if e.device_type == DeviceType.CPU and not e.is_user_annotation]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation
               and e.key != LAUNCH_QUEUE_FULL]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6
    cats: dict[str, float] = {}
    for e in kernels:
        cats[kernel_category(e.key)] = cats.get(kernel_category(e.key), 0.0) + e.self_device_time_total / 1e6

    def top_by(items: list[Any], key: str) -> list[dict[str, Any]]:
        items = sorted((e for e in items if getattr(e, key) > 0), key=lambda e: -getattr(e, key))[:top]
        return [{"name": e.key, "s": getattr(e, key) / 1e6, "calls": e.count} for e in items]

    return {
        "wall_s": wall,
        "gpu_kernel_s": busy if cuda else None,
        "gpu_busy_share": busy / wall if cuda else None,
        "launch_queue_full_events": sum(e.count for e in events if e.key == LAUNCH_QUEUE_FULL),
        "kernel_s_by_category": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "range_device_s": {k: next((e.device_time_total / 1e6 for e in events if e.key == k), None) for k in ranges or {}},
        "top_ops_by_self_device_time": top_by(ops, "self_device_time_total") if cuda else [],
        "top_kernels": top_by(kernels, "self_device_time_total"),
        "top_ops_by_self_cpu_time": top_by(ops, "self_cpu_time_total"),
        "gpu_idle_gaps": gaps,
    }


def guarded_gaps(prof: Any) -> dict[str, Any]:
    """`idle_gaps` of a profile's events; an error message instead where the profiler's event
    list is not what it expects (a diagnostic must not cost the measurements)."""
    from torch.autograd import DeviceType

    try:
        events = [Span(e.name, e.time_range.start, e.time_range.end, e.device_type == DeviceType.CUDA,
                       e.is_user_annotation) for e in prof.events()
                  if e.name != LAUNCH_QUEUE_FULL and not (e.device_type == DeviceType.CUDA and e.is_user_annotation)]
        return idle_gaps(events)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:300]}


@dataclass
class Span:
    """One profiler event: a GPU kernel or memcpy (`gpu`), a CPU op, or a `record_function` range
    (`annotation`: the recipes' phases, the module ranges); times in microseconds."""

    name: str
    start: float
    end: float
    gpu: bool
    annotation: bool = False


def idle_gaps(events: list[Span], top: int = 10, min_gap_us: float = 200.0) -> dict[str, Any]:
    """Where the GPU had nothing to run: the stretches between kernels (overlapping kernels
    merged), their total and count above `min_gap_us`, and the `top` longest, each with the
    ranges it lies in (phase, module), the CPU op running when it began (the innermost; a sync
    such as aten::item runs until just after the GPU drains), or else the last one that ended,
    and the first CPU op that began inside it (whose launch ended it)."""
    kernels = sorted((e.start, e.end) for e in events if e.gpu)
    gaps, busy_until = [], kernels[0][1] if kernels else 0.0
    for start, end in kernels[1:]:
        if start - busy_until >= min_gap_us:
            gaps.append((busy_until, start))
        busy_until = max(busy_until, end)
    cpu = sorted((e for e in events if not e.gpu and not e.annotation), key=lambda e: e.start)
    ranges = [e for e in events if not e.gpu and e.annotation]

    def describe(a: float, b: float) -> dict[str, Any]:
        running = [e for e in cpu if e.start <= a < e.end]  # a sync runs until just after the GPU drains
        before = (max(running, key=lambda e: e.start) if running
                  else max((e for e in cpu if e.end <= a), key=lambda e: e.end, default=None))
        inside = next((e for e in cpu if a <= e.start < b and not e.name.startswith("cu")), None)  # not the launch call
        return {
            "ms": (b - a) / 1e3,
            "at_ms": (a - kernels[0][0]) / 1e3,
            "in": sorted({r.name for r in ranges if r.start <= a and b <= r.end}),
            "after_cpu_op": before.name if before else None,
            "first_cpu_op_inside": inside.name if inside else None,
        }

    longest = sorted(gaps, key=lambda g: g[0] - g[1])[:top]
    by_range: dict[str, list[float]] = {}  # where the idle time is: per set of enclosing ranges
    for a, b in gaps:
        where = ", ".join(sorted({r.name for r in ranges if r.start <= a and b <= r.end})) or "-"
        by_range.setdefault(where, [0.0, 0])
        by_range[where][0] += (b - a) / 1e3
        by_range[where][1] += 1
    return {
        "idle_ms": sum(b - a for a, b in gaps) / 1e3,
        "gaps": len(gaps),
        "min_gap_us": min_gap_us,
        "longest": [describe(a, b) for a, b in sorted(longest)],
        "by_range": {k: {"ms": v[0], "gaps": v[1]} for k, v in sorted(by_range.items(), key=lambda kv: -kv[1][0])},
    }


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the kernels (below autograd, after decompositions), views
    apart: in eager code about one GPU kernel launch each, on any device. Code compiled by inductor
    calls its fused kernels directly, so there only the ops it leaves to aten (matmuls, attention)
    are seen."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any], top: int = 8) -> dict[str, Any]:
    """One call of `fn` under `OpCounter`: all ops, the dtype casts (`_to_copy`), the most frequent."""
    with OpCounter() as c:
        fn()
    return {"ops": sum(c.counts.values()), "casts": c.counts.get("_to_copy", 0),
            "most_frequent": dict(sorted(c.counts.items(), key=lambda kv: -kv[1])[:top])}


def profile_text(title: str, p: dict[str, Any]) -> str:
    lines = [f"== torch.profiler: {title}; {p['wall_s']:.3f} s wall under the profiler"]
    if p.get("op_count"):
        c = p["op_count"]
        lines.append(f"   aten ops dispatched (views apart; another step, outside the profiler): {c['ops']}, of which "
                     f"{c['casts']} dtype casts; most frequent: " + ", ".join(f"{k} {v}" for k, v in c["most_frequent"].items()))
    if p["gpu_kernel_s"] is not None:
        lines.append(f"   GPU kernels {p['gpu_kernel_s']:.3f} s = {p['gpu_busy_share']:.0%} of the wall time; launch queue "
                     f"full {p['launch_queue_full_events']} times (the CPU waited on the GPU)")
        lines.append("   kernel time by category: " + ", ".join(f"{k} {v:.3f} s" for k, v in p["kernel_s_by_category"].items()))
    if p["range_device_s"] and p["gpu_kernel_s"] is not None:
        lines.append("   device time inside forward calls (student and teacher; backward not included): " + ", ".join(
            f"{k} {v:.3f} s" for k, v in p["range_device_s"].items() if v is not None))
    gaps = p.get("gpu_idle_gaps")
    if gaps and "error" not in gaps:
        lines.append(f"   GPU idle {gaps['idle_ms']:.1f} ms in {gaps['gaps']} gaps of {gaps['min_gap_us']:.0f} us or more; "
                     "the longest (at ms from the first kernel: length, ranges, the CPU op at its start, the first inside):")
        lines += [f"   {g['at_ms']:9.1f}: {g['ms']:6.2f} ms  [{', '.join(g['in'])}]  after {g['after_cpu_op']}, "
                  f"then {g['first_cpu_op_inside']}" for g in gaps["longest"]]
        if gaps.get("by_range"):
            lines.append("   idle by enclosing ranges: " + "; ".join(
                f"[{k}] {v['ms']:.1f} ms in {v['gaps']}" for k, v in list(gaps["by_range"].items())[:8]))
    elif gaps:
        lines.append(f"   GPU idle gaps: {gaps['error']}")
    for key, label in (("top_ops_by_self_device_time", "top ops by self GPU time"), ("top_kernels", "top GPU kernels"),
                       ("top_ops_by_self_cpu_time", "top ops by self CPU time")):
        if p[key]:
            lines.append(f"   {label}:")
            lines += [f"   {o['s'] * 1e3:10.1f} ms {o['calls']:7d}x  {o['name'][:120]}" for o in p[key]]
    return "\n".join(lines)
