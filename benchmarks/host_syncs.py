"""Where a training step would make the CPU wait for the GPU (host synchronisations), counted on the CPU.

On an H100 one Vision-OPD step of the 3B benchmark made 45 `cudaStreamSynchronize` calls on
2026-12-07 with the host-syncs change (`opd-master-compiled`; 51 in the eager `opd-master` step;
docs/data/perf-2026-12-07-h100-whole/perfs/profile_*.txt), and its GPU idled about a third of the
step. The profiler gives the count, not the places. This script runs the same step on the CPU and
says where each sync would happen: a Qwen2.5-VL of the 3B's depth (36 decoder layers, 32 vision
blocks, full attention in 4 of them) with tiny widths, the benchmark's batch (1 prompt x 8 rollouts
of 256 tokens from the fixed engine, micro-batch 8, 896 px ZoomWorld images), the live student as
the teacher, bf16 weights with fp32 masters in torch's fused AdamW, activation checkpointing.

    PYTHONPATH=src .venv/bin/python benchmarks/host_syncs.py --out /tmp/hs                 # Vision-OPD
    PYTHONPATH=src .venv/bin/python benchmarks/host_syncs.py --out /tmp/hs --recipe grpo   # GRPO

About a minute on 2 CPU cores. One warm-up step (optimizer state made, attention plans cached) is
counted apart; then `--steps` steps are counted and reported per step. Writes OUT/host_syncs.json
(every site, per step) and OUT/host_syncs.md (the tables).

What counts as a sync (what makes pytorch wait for the GPU on CUDA):
  - reading a value: .item(), bool(t) and `if t:`, int(t), float(t), f"{t}", a tensor used as a
    Python number (torch.arange(t), x[:t]), .tolist(), .numpy(), .cpu(), .to("cpu"), torch.equal;
  - ops whose output size depends on the data: nonzero (and torch.where(c)), masked_select (also in
    masked_scatter's backward), unique, bincount, repeat_interleave without output_size, indexing
    with a boolean mask, masked_fill with a GPU tensor as the value;
  - blocking copies to the GPU: .to(device) without non_blocking=True, torch.tensor(data,
    device=...), x.new_tensor(data), and a GPU tensor indexed by a host tensor (torch copies the
    index over first).
Each one is counted under the first stack frame inside src/zoomless (file:line, function) and
"via", the innermost frame outside torch: where transformers, accelerate or our own code called it.

On the CPU every tensor is on the CPU, so the script keeps track of which tensors *would* be on
the GPU, with a mark on each: the model's parameters and buffers, the fp32 masters, what our
`transfer.to_device` sends to run.device (the batches, the shared-image gathers: a no-op here,
so it returns a marked copy), tensors made with `device=` a marked tensor's `.device`, and, op by
op, every output of an op that reads a marked tensor. A value read from an unmarked tensor (a batch
built on the CPU, the M-RoPE position ids made there, the shared-image patch counts) is no sync on a
GPU: those reads are listed apart, as "host reads", so that one can see what was left out.

Limits: a stand-in for the profiler's count, not that count. What a CUDA kernel does in C++
(cuDNN, allocator retries) and the code that runs only on CUDA (`x.is_cuda` branches) are not seen;
a tensor made in C++ outside every op the script sees loses its mark and counts as a host tensor;
the step runs eagerly. On 2026-12-07 (torch 2.14 CPU; transformers 5.25, and 5.17 as on the GPU)
it counted 43 syncs per Vision-OPD step against the GPU's 45 (compiled) and 51 (eager), and 29 per
GRPO step; after the recipes kept their per-micro-batch sums on the GPU (`metrics.read_values`),
42 and 23; with the vision tower's bookkeeping done on the CPU (`models/vision_plan.py`) and no
all-ones attention mask, 9 and 6 (docs/PERFORMANCE_LOG.md).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_common as dc  # noqa: E402
import host_overhead as ho  # noqa: E402
import perf_3b_train as pt  # noqa: E402

from zoomless import transfer  # noqa: E402
from zoomless.models import tiny  # noqa: E402
from zoomless.train import batching, shared_images  # noqa: E402

GPU_COUNTS = {  # the profiler's cudaStreamSynchronize count of one step, to compare with
    "opd": "4 per 3B Vision-OPD step (opd-master-compiled, H100, 2026-12-07, placeholders on the CPU but "
           "masked_scatter's backward still there: 3 counted here then; 45 a day earlier)",
    "grpo": "3 per 3B GRPO step (grpo-master-compiled, H100, 2026-12-07, as for opd: 3 counted here then)",
}
ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src" / "zoomless")
# frames that are not "where it happened": torch itself, the standard library, this script
SKIP = (str(Path(torch.__file__).parent), sysconfig.get_paths()["stdlib"], str(Path(__file__).resolve()))
aten = torch.ops.aten

# the kinds of sync, as the tables name them
ITEM = "read a value (.item/bool/int/float)"
TOLIST = ".tolist()"
TO_HOST = "copy to the host (.cpu/.to(cpu)/.numpy)"
TO_DEVICE = "blocking copy to the GPU"
HOST_INDEX = "GPU tensor indexed by a host tensor"
MASK = "boolean-mask indexing"
SHAPE_OPS = {aten.nonzero.default: "nonzero", aten.masked_select.default: "masked_select",
             aten._unique2.default: "unique", aten.unique_consecutive.default: "unique_consecutive",
             aten.unique_dim.default: "unique", aten.bincount.default: "bincount", aten.equal.default: "torch.equal",
             aten.masked_scatter_backward.default: "masked_select (masked_scatter's backward)"}
MASKED_FILL = (aten.masked_fill.Tensor, aten.masked_fill_.Tensor)  # CUDA reads a tensor `value` with .item()
INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
FACTORIES_WITH_DATA = (torch.tensor, torch.as_tensor, torch.asarray)  # these copy host data to `device`


# ----------------------------------------------------------------------------- which tensors are on the GPU

ON_DEVICE = "_host_syncs_on_device"  # an attribute on each tensor that would live on the GPU


def on_device(t: Any) -> bool:
    return isinstance(t, Tensor) and getattr(t, ON_DEVICE, False)


def mark(value: Any, device: bool = True) -> None:
    """Mark every tensor in `value` (a tensor, or lists, tuples, dicts of them) as on the GPU, or not."""
    for t in tree_leaves(value):
        if isinstance(t, Tensor):
            setattr(t, ON_DEVICE, device)


class SyncCounter:
    """What the two modes share. `_Calls` (the Python API) sees .tolist(), .to(), .cpu(), the
    factories' `device=` and which device objects name the GPU; `_Ops` (every aten op, the
    backward's too) carries the marks from inputs to outputs and sees .item() and the
    data-dependent ops, however Python asked for them."""

    def __init__(self) -> None:
        # id -> device object (kept alive, so that its id is not reused): those that stand for the GPU
        # (a marked tensor's .device, run.device) and those that name the host (an unmarked tensor's
        # .device, "cpu"). A device made elsewhere (in C++) is neither: a .to() to it moves nothing.
        self.gpu_devices: dict[int, torch.device] = {}
        self.host_devices: dict[int, torch.device] = {}
        self.step: int | None = None  # the step being recorded (0: warm-up); None: nothing recorded
        self.syncs: dict[int, Counter] = {}  # step -> (kind, site, via) -> count
        self.host_reads: dict[int, Counter] = {}  # the same reads of host tensors: no syncs on a GPU

    def name_device(self, device: torch.device, gpu: bool) -> None:
        (self.gpu_devices if gpu else self.host_devices)[id(device)] = device

    def is_gpu(self, device: Any) -> bool:
        if isinstance(device, Tensor):
            return on_device(device)
        return id(device) in self.gpu_devices or (isinstance(device, str) and device.startswith("cuda"))

    def is_host(self, device: Any) -> bool:
        if isinstance(device, Tensor):
            return not on_device(device)
        return id(device) in self.host_devices or (isinstance(device, str) and device.startswith("cpu"))

    def record(self, kind: str, device: bool) -> None:
        if self.step is None:
            return
        table = self.syncs if device else self.host_reads
        table.setdefault(self.step, Counter())[(kind, *where())] += 1

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with _Calls(self), _Ops(self):
            yield


def where() -> tuple[str, str]:
    """(the first frame inside src/zoomless, the innermost frame outside torch) of the caller."""
    site = via = None
    f: FrameType | None = sys._getframe(1)
    while f is not None and site is None:
        path = f.f_code.co_filename
        if via is None and not path.startswith(SKIP):
            via = f
        if path.startswith(SRC):
            site = f
        f = f.f_back
    return frame_name(site), ("-" if via is None or via is site else frame_name(via))


def frame_name(f: FrameType | None) -> str:
    if f is None:
        return "(no frame in src/zoomless)"
    path = f.f_code.co_filename
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif path.startswith(str(ROOT)):
        path = str(Path(path).relative_to(ROOT))
    return f"{path}:{f.f_lineno} {f.f_code.co_name}"


def target_device(args: tuple, kwargs: dict) -> Any:
    """The device a `.to(...)` call asks for (a device, a string or another tensor), or None (a dtype only)."""
    for a in (kwargs.get("device"), *args):
        if isinstance(a, (str, torch.device, Tensor)):
            return a
    return None


class _Calls(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.c = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        c, out = self.c, func(*args, **kwargs)
        this = args[0] if args and isinstance(args[0], Tensor) else None
        if getattr(func, "__self__", None) is Tensor.device:  # x.device names the GPU or the host, as x is marked
            c.name_device(out, on_device(this))
        elif func is torch.device and args and (c.is_gpu(args[0]) or c.is_host(args[0])):  # torch.device(x.device)
            c.name_device(out, c.is_gpu(args[0]))
        elif func in (Tensor.tolist, Tensor.numpy) and on_device(this):
            c.record(TOLIST if func is Tensor.tolist else TO_HOST, True)
        elif func is Tensor.cpu and on_device(this):
            c.record(TO_HOST, True)
            out = out.clone() if out is this else out  # a GPU tensor's .cpu() is a new tensor
            mark(out, False)
        elif func is Tensor.to and this is not None and (dest := target_device(args[1:], kwargs)) is not None:
            # a non-blocking copy calls no cudaStreamSynchronize (from pageable memory it still blocks)
            blocking = not kwargs.get("non_blocking", False)
            if c.is_gpu(dest) and not on_device(this):  # host -> GPU
                if blocking:
                    c.record(TO_DEVICE, True)
                out = out.clone() if out is this else out  # a new tensor on a GPU
                mark(out)
            elif c.is_host(dest) and on_device(this):  # GPU -> host
                if blocking:
                    c.record(TO_HOST, True)
                out = out.clone() if out is this else out
                mark(out, False)
        elif func is Tensor.new_tensor and on_device(this):
            c.record(TO_DEVICE, True)
            mark(out)
        elif c.is_gpu(kwargs.get("device")):  # torch.zeros(..., device=x.device) and the like
            if func in FACTORIES_WITH_DATA and not on_device(args[0] if args else kwargs.get("data")):
                c.record(TO_DEVICE, True)
            mark(out)
        return out


class _Ops(TorchDispatchMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        c, device = self.c, any(on_device(t) for t in tree_leaves((args, kwargs)))
        if func is aten.copy_.default:  # dst.copy_(src): dst stays where it is
            dst, src = args[0], args[1]
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            if on_device(dst) != on_device(src) and src.dim() and not non_blocking:
                c.record(TO_DEVICE if on_device(dst) else TO_HOST, True)
            return out
        if func is aten._local_scalar_dense.default:  # .item(), bool(t), int(t), a tensor as a number
            c.record(ITEM, device)
        elif func in SHAPE_OPS:
            c.record(SHAPE_OPS[func], device)
        elif func in MASKED_FILL and on_device(args[2]):
            c.record("masked_fill with a tensor value", True)
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            c.record("repeat_interleave without output_size", device)
        elif func in INDEX_OPS:  # x[index], x[index] = v, and the backward of x[index]
            for index in (i for i in args[1] if isinstance(i, Tensor)):
                if index.dtype in (torch.bool, torch.uint8):  # a mask becomes indices by nonzero, where it is
                    c.record(MASK, on_device(index))
                if on_device(args[0]) and not on_device(index):  # torch copies a host index over, blocking
                    c.record(HOST_INDEX, True)
        if device:
            mark(out)
        return out


@contextlib.contextmanager
def copies_to_device(counter: SyncCounter) -> Iterator[None]:
    """Our code sends tensors to the GPU with `transfer.to_device` (the batches, the shared-image
    gathers, the vision bookkeeping; from pinned memory, without blocking: no sync). On the CPU that
    is a no-op, so here it returns a marked copy for the GPU, as it returns a new tensor there."""
    original = transfer.to_device

    def to_device(t: Tensor, device: Any) -> Tensor:
        out = original(t, device)
        if counter.is_gpu(device) and not on_device(t):
            out = out.clone() if out is t else out
            mark(out)
        return out

    # every module that imported it by name
    modules = [m for m in list(sys.modules.values()) if getattr(m, "to_device", None) is original]
    for m in modules:
        m.to_device = to_device
    try:
        yield
    finally:
        for m in modules:
            m.to_device = original


# ----------------------------------------------------------------------------- the run


def build(a: argparse.Namespace, work: Path) -> tuple[Any, Any]:
    """The model (the 3B's depth and full-attention vision blocks, tiny widths), one batch of
    ZoomWorld prompts and the run, as perf_3b_train.py builds them; returns (run, step function)."""
    from zoomless.models.loading import vision_token_ids
    from zoomless.train.common import start_run
    from zoomless.train.config import OPDConfig

    tiny.SIZES.setdefault("deep-narrow", ho.DEEP_NARROW)
    model_dir = tiny.build_tiny_vlm(work / "model", size="deep-narrow", max_pixels=a.max_pixels)
    config = json.loads((model_dir / "config.json").read_text())
    config["vision_config"]["fullatt_block_indexes"] = dc.QWEN25_VL_3B["fullatt_blocks"]
    (model_dir / "config.json").write_text(json.dumps(config))
    data = dc.build_data(work / "data", a.prompts, a.image_size)  # exactly one batch: every step the same
    cfg = OPDConfig(
        model_dir=model_dir, data=data, out_dir=work / "run", batch_size=a.prompts, n=a.rollouts,
        micro_batch_size=a.micro, max_new_tokens=a.response_len, max_pixels=a.max_pixels, gradient_checkpointing=True,
        teacher="student", bf16_weights=not a.fp32_weights, device="cpu", lr=1e-6, warmup_steps=0, max_steps=10**6,
        tensorboard=False, progress=False,
    )
    run = start_run(cfg)
    engine = dc.FixedEngine(run.processor, a.response_len)
    banned, counter = vision_token_ids(run.processor), itertools.count(1)
    if a.recipe == "grpo":
        return run, pt.grpo_step_fn(pt.grpo_config(cfg), run, engine, banned, counter)
    return run, pt.opd_step_fn(cfg, run, run.model, engine, banned, counter)  # the teacher is the live student


def count(a: argparse.Namespace) -> dict[str, Any]:
    from zoomless.train.metrics import Timer

    counter = SyncCounter()
    with tempfile.TemporaryDirectory() as tmp:
        run, step = build(a, Path(tmp))
        # what starts on the GPU: the weights, buffers and fp32 masters, and run.device itself
        mark([list(run.model.parameters()), list(run.model.buffers()), run.master.masters if run.master else []])
        counter.name_device(run.device, gpu=True)
        seconds = []
        # the modes are on from the warm-up step on, so that the marks reach what it makes (the
        # optimizer state); its syncs are kept apart
        with copies_to_device(counter), counter.active():
            for i in range(a.steps + 1):
                counter.step = i
                t0 = time.perf_counter()
                step(Timer())
                seconds.append(time.perf_counter() - t0)
                print(f"[host_syncs] step {i}{' (warm-up)' if i == 0 else ''}: "
                      f"{sum(counter.syncs.get(i, Counter()).values())} syncs, {seconds[-1]:.1f} s", flush=True)
        counter.step = None
    return summary(a, counter, seconds)


def rows(tables: dict[int, Counter], steps: int) -> list[dict[str, Any]]:
    """One row per (kind, site, via) over the counted steps (1..steps), the most frequent first."""
    counted = [tables.get(i, Counter()) for i in range(1, steps + 1)]
    out = [{"per_step": sum(t[k] for t in counted) / steps, "kind": k[0], "site": k[1], "via": k[2],
            "by_step": [t[k] for t in counted]} for k in set().union(*counted)]
    return sorted(out, key=lambda r: (-r["per_step"], r["site"], r["via"]))


def summary(a: argparse.Namespace, c: SyncCounter, seconds: list[float]) -> dict[str, Any]:
    import transformers

    syncs, host = rows(c.syncs, a.steps), rows(c.host_reads, a.steps)
    by_site: Counter = Counter()
    by_kind: Counter = Counter()
    for r in syncs:
        by_site[r["site"]] += r["per_step"]
        by_kind[r["kind"]] += r["per_step"]
    return {
        "recipe": a.recipe, "steps": a.steps, "torch": torch.__version__, "transformers": transformers.__version__,
        "setup": {"model": "Qwen2.5-VL, 36 decoder layers, 32 vision blocks (full attention in 7, 15, 23, 31), "
                           "widths 64 (random weights)",
                  "prompts": a.prompts, "rollouts": a.rollouts, "micro_batch": a.micro,
                  "response_tokens": a.response_len,
                  "image_size": a.image_size, "max_pixels": a.max_pixels,
                  "weights": "fp32 + bf16 autocast" if a.fp32_weights else "bf16 + fp32 masters in fused AdamW",
                  "gradient_checkpointing": True, "teacher": "the live student" if a.recipe == "opd" else None},
        "syncs_per_step": sum(by_kind.values()),
        "syncs_by_step": [sum(c.syncs.get(i, Counter()).values()) for i in range(1, a.steps + 1)],
        "warmup_step_syncs": sum(c.syncs.get(0, Counter()).values()),
        "by_site": dict(by_site.most_common()), "by_kind": dict(by_kind.most_common()), "sites": syncs,
        "host_reads_per_step": sum(r["per_step"] for r in host), "host_reads": host,
        "seconds_per_step": seconds[1:], "gpu_reference": GPU_COUNTS[a.recipe],
    }


# ----------------------------------------------------------------------------- report


def markdown(r: dict[str, Any], top_host: int = 10) -> str:
    s = r["setup"]
    lines = [f"# Host syncs per {'Vision-OPD' if r['recipe'] == 'opd' else 'GRPO'} step, counted on the CPU "
             "(benchmarks/host_syncs.py)", "",
             f"{s['model']}; {s['prompts']} prompt x {s['rollouts']} rollouts x {s['response_tokens']} tokens, "
             f"micro-batch {s['micro_batch']}, {s['image_size']} px images; {s['weights']}; torch {r['torch']}, "
             f"transformers {r['transformers']}.", "",
             f"**{r['syncs_per_step']:g} syncs per step** (counted steps: {', '.join(map(str, r['syncs_by_step']))}; "
             f"the warm-up step: {r['warmup_step_syncs']}). The profiler on a GPU: {r['gpu_reference']}.", "",
             "By the first frame inside src/zoomless:", "", "| per step | site |", "|---:|---|"]
    lines += [f"| {n:g} | `{site}` |" for site, n in r["by_site"].items()]
    lines += ["", "Every site (via: the innermost frame outside torch, where torch was called):", "",
              "| per step | kind | src/zoomless site | via |", "|---:|---|---|---|"]
    lines += [f"| {x['per_step']:g} | {x['kind']} | `{x['site']}` | `{x['via']}` |" for x in r["sites"]]
    lines += ["", f"Not counted: {r['host_reads_per_step']:g} reads of host tensors per step (no sync on a GPU); "
              f"the {top_host} most frequent:", "",
              "| per step | kind | src/zoomless site | via |", "|---:|---|---|---|"]
    lines += [f"| {x['per_step']:g} | {x['kind']} | `{x['site']}` | `{x['via']}` |" for x in r["host_reads"][:top_host]]
    return "\n".join(lines) + "\n"


def table(r: dict[str, Any]) -> str:
    """The console version: per zoomless site, then every (kind, site, via), the most frequent first."""
    lines = ["by the first frame inside src/zoomless:", f"{'per step':>8}  site"]
    lines += [f"{n:>8g}  {site}" for site, n in r["by_site"].items()]
    lines += ["", "every site (via: the innermost frame outside torch):",
              f"{'per step':>8}  {'kind':<42} {'src/zoomless site':<56} via"]
    lines += [f"{x['per_step']:>8g}  {x['kind']:<42} {x['site']:<56} {x['via']}" for x in r["sites"]]
    lines += ["", f"{r['syncs_per_step']:>8g}  syncs per step (counted steps {r['syncs_by_step']}, warm-up "
              f"{r['warmup_step_syncs']}); the profiler on a GPU: {r['gpu_reference']}",
              f"{r['host_reads_per_step']:>8g}  reads of host tensors per step, not counted (host_syncs.md lists them)"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="host_syncs.json and host_syncs.md go here")
    p.add_argument("--recipe", choices=("opd", "grpo"), default="opd")
    p.add_argument("--steps", type=int, default=2, help="counted steps, after one warm-up step")
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--micro", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--response-len", type=int, default=256, help="tokens per response (plus the answer)")
    p.add_argument("--image-size", type=int, default=896, help="ZoomWorld image side")
    p.add_argument("--max-pixels", type=int, default=896 * 896)
    p.add_argument("--fp32-weights", action="store_true", help="fp32 weights + bf16 autocast (the recipe's "
                   "default) instead of bf16 weights + fp32 masters (the 3B benchmark's opd-master)")
    a = p.parse_args()
    torch.manual_seed(0)
    r = count(a)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "host_syncs.json").write_text(json.dumps(r, indent=2))
    (a.out / "host_syncs.md").write_text(markdown(r))
    print("\n" + table(r))
    print(f"\nwrote {a.out / 'host_syncs.json'} and host_syncs.md")


if __name__ == "__main__":
    main()
