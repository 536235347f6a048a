"""Time a teacher-forced forward + backward with each prompt's image encoded once per rollout
(HF's way) and once per prompt (`zoomless.train.shared_images`), on the shipped ZoomWorld BASE.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/shared_images.py --prompts 8 --rollouts 4

The shape is the demo's Vision-OPD step (8 prompts x 4 answers, full 224-px scenes, 8-token
answers). Prints seconds per step for both and their ratio; `--device cuda` runs it on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from zoomless.demo import SIZE, WORLD, shipped_model_dir
from zoomless.models.loading import load_vlm
from zoomless.sample import read_samples
from zoomless.train.batching import build_batch, encode_prompt, response_hidden
from zoomless.train.common import pad_id
from zoomless.train.views import view_conversation
from zoomless.world.generate import generate_split


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: the shipped ZoomWorld BASE")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    model, processor = load_vlm(args.model or shipped_model_dir(), dtype=torch.float32, device=args.device,
                                max_pixels=SIZE * SIZE)
    model.train()
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_split(tmp, "bench", args.prompts, **WORLD, progress=False)
        convs = [view_conversation(s, "full", "open", max_pixels=SIZE * SIZE, crop_margin=0.25, zoom=2.0)
                 for s in read_samples(data)]
    prompts = [encode_prompt(processor, c) for c in convs]
    answers = [[5 + (k % 50)] * args.answer_tokens for k in range(args.prompts * args.rollouts)]
    # the same rows twice: one PromptEncoding object per prompt (shared), or one per row (copies)
    shared = build_batch([p for p in prompts for _ in range(args.rollouts)], answers, pad_id(processor))
    copies = build_batch([encode_prompt(processor, c) for c in convs for _ in range(args.rollouts)], answers,
                         pad_id(processor))
    assert shared.sharing is not None and copies.sharing is None

    def step(batch) -> float:
        batch = batch.to(args.device)
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        response_hidden(model, batch).pow(2).mean().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    times = {"every copy (HF)": [], "once per prompt": []}
    for batch in (copies, shared):  # warm-up
        step(batch)
    for _ in range(args.repeats):
        times["every copy (HF)"].append(step(copies))
        times["once per prompt"].append(step(shared))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>18}: {v:.3f} s per forward+backward (median of {args.repeats})")
    print(f"speed-up: {med['every copy (HF)'] / med['once per prompt']:.2f}x "
          f"({args.prompts} prompts x {args.rollouts} rollouts, {args.device}, threads {torch.get_num_threads()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
