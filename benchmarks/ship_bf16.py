"""Copy every model directory under SRC to DST with its floating-point weights stored in bf16.

    python benchmarks/ship_bf16.py /tmp/zoomworld/ship /tmp/ship-bf16

Halves the bytes of a model committed to the repository; `load_vlm(..., dtype=torch.float32)`
upcasts on load. Results of a shipped model are measured on this bf16 copy, not on the original.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def ship_bf16(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "trainer_state.pt", "teacher"))
    for f in src.glob("*.safetensors"):
        weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(weights, dst / f.name, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


if __name__ == "__main__":
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    for d in sorted(p for p in src.iterdir() if (p / "config.json").exists()):
        ship_bf16(d, dst / d.name)
        print(d.name, sum(f.stat().st_size for f in (dst / d.name).rglob("*") if f.is_file()), "bytes")
