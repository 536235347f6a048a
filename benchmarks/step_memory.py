"""Memory of one `bf16_weights` training step, measured on the CPU by category: what the step holds
at rest (bf16 weights, fp32 masters, AdamW moments), at the end of the backward (plus gradients and
the activations still alive) and at its peak (torch's MemTracker, which follows every tensor's
storage through a dispatch mode; no GPU needed).

A GPU's peak also holds the allocator's cache and the kernels' workspaces, and the 3B shape does not
fit this machine, so the absolute numbers are not a GPU's. What carries over is the difference
between two trees of the code at the same shape, because the step's tensors are the same on any
device: run the script with `PYTHONPATH=src` and with an older tree's `src` (the imports work with
the train package before and after its split into modules).

    PYTHONPATH=src python benchmarks/step_memory.py --out /tmp/mem            # about a minute on 2 cores
    PYTHONPATH=build/head/src python benchmarks/step_memory.py --out /tmp/mem-head
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from zoomless.models import tiny
from zoomless.models.loading import load_vlm
from zoomless.sample import read_samples
from zoomless.train.batching import build_batch, encode_prompt, response_hidden
from zoomless.train.master import MasterWeights
from zoomless.world.generate import generate_split

try:  # the train package since session 20
    from zoomless.train.common import enable_activation_checkpointing, pad_id
    from zoomless.train.optim import build_optimizer, clip_and_step
    from zoomless.train.views import view_conversation
except ImportError:  # before it: everything in train/common.py
    from zoomless.train.common import (  # type: ignore[attr-defined,no-redef]
        build_optimizer, clip_and_step, enable_activation_checkpointing, pad_id, view_conversation,
    )

# a model whose parameters, not its activations, take most of the memory, as at 3B: 8 decoder
# layers of width 1,024 (99M parameters), a small vision tower
SHAPE = tiny.TinySize(2000, 2, 64, 2, 8, 1024, 8, 4, 2816, tie_embeddings=False)
MiB = 2**20


def total(mt: MemTracker, kind: str) -> int:
    """Bytes tracked on the CPU, at the moment (`current`) or the highest so far (`peak`)."""
    return sum(d["Total"] for d in mt.get_tracker_snapshot(kind).values())


def build(work: Path, rollouts: int, response: int) -> tuple[Any, Any]:
    """The model (bf16 weights, fp32 masters, checkpointed) and one prompt's rollouts as a batch."""
    model, processor = load_vlm(tiny.build_tiny_vlm(work / "m", size="step-memory"), dtype=torch.float32,
                                device="cpu")
    enable_activation_checkpointing(model)
    model.train()
    sample = read_samples(generate_split(work / "world", "train", 1, seed=1, size=448, progress=False))[0]
    conv = view_conversation(sample, "full", "open", max_pixels=112 * 112, crop_margin=0.25, zoom=2.0)
    prompt = encode_prompt(processor, conv)
    batch = build_batch([prompt] * rollouts, [list(range(5, 5 + response))] * rollouts, pad_id(processor))
    return model, batch.to("cpu")


def measure(model: Any, batch: Any, micro_batches: int) -> dict[str, float]:
    """MiB at rest, after the backward and at the peak of one tracked step (after a warm-up step,
    so that AdamW's moments exist)."""
    master = MasterWeights(model)
    optimizer = build_optimizer(master.masters, 1e-5, 0.0, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    run = SimpleNamespace(dist=SimpleNamespace(fsdp=False), master=master, optimizer=optimizer,
                          scheduler=scheduler, policy=model)  # what clip_and_step reads of a Run

    def backward(mt: MemTracker | None = None) -> None:
        for _ in range(micro_batches):
            if mt is not None:
                mt.reset_mod_stats()  # its per-module stats take one call per module; the totals go on
            response_hidden(model, batch).float().pow(2).mean().backward()

    backward()
    clip_and_step(run, 1.0)
    mt = MemTracker()
    mt.track_external(model, optimizer, *master.masters)
    with mt:
        rest = total(mt, "current")
        backward(mt)
        after_backward = total(mt, "current")
    # the optimizer step alone, under a tracker of its own: what exists now is the state at rest
    # and the step's gradients (fp32 on the masters, or held in bf16 where the tree holds them)
    grads = [m.grad for m in master.masters if m.grad is not None] + list(getattr(master, "_held", {}).values())
    step = MemTracker()
    step.track_external(model, optimizer, *master.masters, *grads)
    del grads
    with step:
        clip_and_step(run, 1.0)
    peak, step_peak = total(mt, "peak"), total(step, "peak")
    master.remove()
    params = sum(m.numel() for m in master.masters)
    return {"parameters": params, "rest_mib": rest / MiB, "after_backward_mib": after_backward / MiB,
            "backward_peak_mib": peak / MiB, "optimizer_step_peak_mib": step_peak / MiB,
            "gradient_bytes_per_parameter": (after_backward - rest) / params,
            "optimizer_step_bytes_per_parameter": (step_peak - rest) / params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results.json and results.md")
    p.add_argument("--rollouts", type=int, default=2, help="sequences per micro-batch (one prompt's rollouts)")
    p.add_argument("--response", type=int, default=32, help="response tokens per sequence")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    torch.manual_seed(0)
    tiny.SIZES.setdefault("step-memory", SHAPE)
    import zoomless

    results: dict[str, Any] = {"tree": str(Path(zoomless.__file__).parent), "torch": torch.__version__, "rows": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.micro_batches:
            model, batch = build(Path(tmp) / f"mb{n}", a.rollouts, a.response)
            results["rows"][n] = row = measure(model, batch, n)
            print(f"{n} micro-batch(es): {row}", flush=True)
            del model, batch
    results["seconds"] = time.perf_counter() - start
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    some = next(iter(results["rows"].values()))
    lines = [f"# Memory of one bf16_weights step on the CPU ({some['parameters'] / 1e6:.1f}M parameters, "
             f"tree {results['tree']})", "",
             "| micro-batches | at rest | backward: peak | after it | optimizer step: peak | gradients after the backward "
             "| optimizer step's peak over rest |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in results["rows"].items():
        lines.append(f"| {n} | {r['rest_mib']:.0f} MiB | {r['backward_peak_mib']:.0f} MiB | "
                     f"{r['after_backward_mib']:.0f} MiB | {r['optimizer_step_peak_mib']:.0f} MiB | "
                     f"{r['gradient_bytes_per_parameter']:.2f} B/parameter | "
                     f"{r['optimizer_step_bytes_per_parameter']:.2f} B/parameter |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
