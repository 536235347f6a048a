"""Vision tower forward+backward with HF's per-chunk attention and with the batched one (issue 9).

    PYTHONPATH=src python benchmarks/fast_vision_speed.py --batch 16 --device cpu

A randomly initialised `small` Qwen2.5-VL (windowed attention in 3 of 4 blocks) or Qwen3-VL sees
`--batch` random scenes of `--size` px (`--mixed`: every other scene a different size, so the
windows come in several lengths). Prints the median seconds of `--reps` forward+backward passes
with and without the patch (interleaved, after one warm-up pass of each), the number of attention calls per pass, and the largest difference
of the outputs and gradients. `--json` also writes the numbers to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from zoomless.models.fast_vision import patch_vision_attention, unpatch_vision_attention
from zoomless.models.loading import load_processor
from zoomless.models.tiny import build_tiny_vlm


def scenes(n: int, size: int, mixed: bool) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    shapes = [(size, size) if not mixed or i % 2 == 0 else (size * 5 // 8, size * 3 // 8) for i in range(n)]
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()) for w, h in shapes]


def count_attention_calls(fn) -> int:
    """Calls into torch's SDPA during `fn()` (HF's sdpa backend calls it once per chunk)."""
    calls = [0]
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        fn()
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    return calls[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"])
    p.add_argument("--model-size", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--mixed", action="store_true")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as training on a GPU runs")
    p.add_argument("--json", type=Path)
    a = p.parse_args()

    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        d = build_tiny_vlm(Path(tmp) / "m", family=a.family, size=a.model_size, max_pixels=a.size * a.size)
        model = AutoModelForImageTextToText.from_pretrained(d, attn_implementation="sdpa").float().to(dev).train()
        ip = load_processor(d).image_processor
    enc = ip(images=scenes(a.batch, a.size, a.mixed), return_tensors="pt")
    pixels, grid = enc["pixel_values"].to(dev), enc["image_grid_thw"].to(dev)
    visual = model.model.visual

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        visual.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            out = visual(pixels, grid_thw=grid).pooler_output
        out.float().square().mean().backward()
        return out.detach().float(), [q.grad.detach().clone() for q in visual.parameters()]

    def timed() -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    # Interleaved (HF, batched, HF, ...) so that a change in the machine's load hits both alike.
    hf_calls = count_attention_calls(step)
    hf_out, hf_grads = step()
    patch_vision_attention(model)
    fast_calls = count_attention_calls(step)
    out, grads = step()
    times: dict[str, list[float]] = {"hf": [], "fast": []}
    for _ in range(a.reps):
        unpatch_vision_attention(model)
        times["hf"].append(timed())
        patch_vision_attention(model)
        times["fast"].append(timed())
    unpatch_vision_attention(model)
    hf_s, fast_s = statistics.median(times["hf"]), statistics.median(times["fast"])
    res = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "family": a.family, "model_size": a.model_size, "batch": a.batch, "size": a.size, "mixed": a.mixed,
        "bf16": a.bf16, "patches_per_pass": int(grid.prod(-1).sum()),
        "hf_seconds": round(hf_s, 4), "fast_seconds": round(fast_s, 4), "speedup": round(hf_s / fast_s, 2),
        "hf_sdpa_calls": hf_calls, "fast_sdpa_calls": fast_calls,
        "max_abs_diff_out": float((out - hf_out).abs().max()),
        "max_abs_diff_grad": max(float((g - h).abs().max()) for g, h in zip(grads, hf_grads)),
    }
    print(json.dumps(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
