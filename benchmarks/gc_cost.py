"""What a full garbage collection costs in a training process, with and without `gc.freeze`.

`train/common.CollectBetweenSteps` keeps Python's collector off during the training loop, and
collects everything only every 100 steps, because a full collection is this costly. Freezing what
survives the first step (the model, its compiled graphs) would make it nearly free; the class does
not, for fear of a frozen object dying in a reference cycle with GPU memory. This measures both: a model
of the Qwen2.5-VL-3B's depth (36 decoder layers, 32 vision blocks) at tiny widths, its blocks
compiled (`compile_blocks`) and two forward+backward passes run, then a full collection timed as
is and after `gc.freeze()`. The object count grows with the depth and the compiled graphs, not the
widths, so it is close to what a real 3B run holds.

    PYTHONPATH=src python benchmarks/gc_cost.py     # about a minute on 2 cores
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import host_overhead as ho  # noqa: E402

from zoomless.models import tiny  # noqa: E402
from zoomless.models.compiled import compile_blocks  # noqa: E402
from zoomless.models.loading import load_vlm  # noqa: E402
from zoomless.train.common import enable_activation_checkpointing  # noqa: E402


def full_collection_ms() -> float:
    t = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    tiny.SIZES.setdefault("deep-narrow", ho.DEEP_NARROW)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, processor = load_vlm(tiny.build_tiny_vlm(work / "m", size="deep-narrow"), dtype=torch.float32,
                                    device="cpu")
        b = ho.batch(processor, work, 8, 32)
    enable_activation_checkpointing(model)
    model.train()
    compile_blocks(model)
    ho.time_steps(model, b, 2)  # compiles
    r = {"objects": len(gc.get_objects()), "full_ms": [full_collection_ms() for _ in range(3)]}
    gc.freeze()
    r["frozen"] = gc.get_freeze_count()
    r["full_ms_frozen"] = [full_collection_ms() for _ in range(3)]
    ho.time_steps(model, b, 3)
    r["full_ms_frozen_after_3_steps"] = full_collection_ms()
    gc.unfreeze()
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
