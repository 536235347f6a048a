"""Host time of a training forward+backward at the 3B *depth* with tiny widths, on the CPU: eager,
compiled block parts, compiled whole decoder layers with vision blocks in parts, compiled whole
decoder layers and vision blocks, and the vision tower compiled as one region (zoomless.models.compiled;
the variants' `compile_blocks` arguments are in VARIANTS).

At the Qwen2.5-VL-3B shape the compiled GPU step is bound by the host: the GPU is busy 67% of it
(docs/PERFORMANCE_LOG.md). What the host does per step grows with the number of blocks called, not
with their width, so a model of the 3B's depth (36 decoder layers, 32 vision blocks) with widths of
64 spends nearly all of its step in the framework (Python, dispatch, dynamo guards, autograd):
a proxy, on any machine, for how much host work each way of compiling leaves. It is not a GPU
timing: there is no kernel launch here, and inductor's CPU kernels are not its CUDA ones.

    PYTHONPATH=src python benchmarks/host_overhead.py --out /tmp/host   # about two minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from zoomless.models import tiny
from zoomless.models.compiled import compile_blocks, uncompile_blocks
from zoomless.models.loading import load_vlm
from zoomless.sample import read_samples
from zoomless.train.batching import build_batch, encode_prompt, response_hidden
from zoomless.train.common import enable_activation_checkpointing, pad_id
from zoomless.train.views import view_conversation
from zoomless.world.generate import generate_split

# the 3B's depth (36 decoder layers, 32 vision blocks) at the test size's widths
DEEP_NARROW = tiny.TinySize(2000, 32, 64, 2, 36, 64, 4, 2, 256, tie_embeddings=False)
# name: compile_blocks' keyword arguments (None: eager)
VARIANTS = {
    "eager": None,
    "compiled-parts": {"whole": False},
    "compiled-whole": {"whole": True, "whole_vision": False},  # vision attention eager, their MLP and norms compiled
    "compiled-whole-vision": {"whole": True, "whole_vision": True},  # compile_blocks' default
    "compiled-tower": {"whole": True, "whole_vision": True, "vision_tower": True},  # the vision tower one region
}


def batch(processor, work: Path, rollouts: int, response: int):
    """`rollouts` sequences of one prompt (a ZoomWorld image) with `response` tokens each."""
    sample = read_samples(generate_split(work / "world", "train", 1, seed=1, size=448, progress=False))[0]
    conv = view_conversation(sample, "full", "open", max_pixels=224 * 224, crop_margin=0.25, zoom=2.0)
    prompt = encode_prompt(processor, conv)
    # .to: the CPU copies of ids and grid the training batches carry (`TeacherForcingBatch.host`)
    return build_batch([prompt] * rollouts, [list(range(5, 5 + response))] * rollouts, pad_id(processor)).to("cpu")


def time_steps(model, b, steps: int) -> list[float]:
    """Seconds of each forward+backward."""
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        response_hidden(model, b).float().pow(2).mean().backward()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results.json and results.md")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--response", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--keep-vision", action="store_true", help="vision blocks not checkpointed (checkpoint_vision: false)")
    p.add_argument("--uncheckpointed", type=int, default=0,
                   help="the last N decoder layers not checkpointed (uncheckpointed_layers)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tiny.SIZES.setdefault("deep-narrow", DEEP_NARROW)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, processor = load_vlm(tiny.build_tiny_vlm(work / "m", size="deep-narrow"), dtype=torch.float32,
                                    device="cpu")
        b = batch(processor, work, a.rollouts, a.response)
    enable_activation_checkpointing(model, a.uncheckpointed, checkpoint_vision=not a.keep_vision)
    model.train()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "tokens": int(b.inputs["input_ids"].numel()),
               "vision_checkpointed": not a.keep_vision, "uncheckpointed_layers": a.uncheckpointed, "variants": {}}
    for name in a.variants:
        kwargs = VARIANTS[name]
        blocks = compile_blocks(model, **kwargs) if kwargs is not None else []
        time_steps(model, b, 2)  # warm-up (compiles)
        times = time_steps(model, b, a.steps)
        results["variants"][name] = {"median_s": statistics.median(times), "min_s": min(times),
                                     "compiled_modules": len(blocks)}
        print(f"{name}: median {statistics.median(times) * 1e3:.1f} ms/step ({len(blocks)} modules compiled)",
              flush=True)
        uncompile_blocks(blocks)
        torch._dynamo.reset()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Host time per forward+backward, 36 decoder layers + 32 vision blocks, widths 64, CPU "
             f"({results['threads']} threads, torch {results['torch']}, {results['tokens']} tokens, vision blocks "
             f"{'' if results['vision_checkpointed'] else 'not '}checkpointed, "
             f"{results['uncheckpointed_layers']} decoder layers not checkpointed)", "",
             "| variant | modules compiled | median ms/step | min ms/step |", "|---|---:|---:|---:|"]
    for name, r in results["variants"].items():
        lines.append(f"| {name} | {r['compiled_modules']} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
