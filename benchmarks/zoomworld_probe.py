"""Can the image tokens tell the panels apart? A linear probe of the vision tower's output.

To answer from the full scene a model must pick the panel whose frame colour the question names.
If the vision tower's output for a panel's tokens does not carry the frame colour, no amount of
language-model training can find the panel. This fits a linear classifier from the mean output
feature of the merged tokens that a panel covers to its frame colour (8 colours), on scenes split
70/30 by scene, for each model given, and writes probe.json and a one-line summary per model:

    python benchmarks/zoomworld_probe.py --out build/probe src/zoomless/assets/zoomworld-base \\
        src/zoomless/assets/zoomworld-ceiling --random

`--random` adds the BASE's architecture with fresh weights: what a vision tower keeps of colour
without any training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from zoomless.train.common import end_of_turn_id
from zoomless.world.dimensions import FRAME_COLORS
from zoomless.world.tensors import WorldSpec, build_world, image_stats, patchify

ROOT = Path(__file__).resolve().parent.parent
ARCH = ROOT / "src/zoomless/assets/zoomworld-base"


def panel_features(model, world, stats, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[P, D] mean vision feature over the merged tokens each panel overlaps, [P] frame colour
    index, [P] scene number: every panel of every scene of `world` (full view)."""
    (bucket,) = world.buckets["full"]
    gh, gw = bucket.grid
    cell = size // (gw // 2)  # pixels per merged token
    feats, colours, scenes = [], [], []
    with torch.no_grad():
        for lo in range(0, len(bucket.rows), 64):
            pixels = bucket.pixels[lo:lo + 64]
            grid = torch.tensor([[1, gh, gw]]).expand(len(pixels), 3)
            out = model.model.get_image_features(patchify(pixels, *stats), grid)
            per_image = out.pooler_output if hasattr(out, "pooler_output") else out
            for j, tokens in enumerate(per_image):
                tokens = tokens.view(gh // 2, gw // 2, -1)
                row = int(bucket.rows[lo + j])
                for panel in world.samples[row].meta["panels"]:
                    x1, y1, x2, y2 = panel["box"]
                    region = tokens[y1 // cell:(y2 - 1) // cell + 1, x1 // cell:(x2 - 1) // cell + 1]
                    feats.append(region.reshape(-1, tokens.shape[-1]).mean(0).float())
                    colours.append(FRAME_COLORS.index(panel["frame"]))
                    scenes.append(row)
    return torch.stack(feats), torch.tensor(colours), torch.tensor(scenes)


def probe(x: torch.Tensor, y: torch.Tensor, scenes: torch.Tensor, seed: int = 0) -> dict:
    """Multinomial logistic regression (standardised features, small L2), trained on 70% of the
    scenes and scored on the rest."""
    gen = torch.Generator().manual_seed(seed)
    ids = scenes.unique()
    test_scenes = ids[torch.randperm(len(ids), generator=gen)[: int(0.3 * len(ids))]]
    test = torch.isin(scenes, test_scenes)
    mean, std = x[~test].mean(0), x[~test].std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], len(FRAME_COLORS), requires_grad=True)
    b = torch.zeros(len(FRAME_COLORS), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z[~test] @ w + b, y[~test]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (z @ w + b).argmax(1)
    majority = torch.bincount(y[~test], minlength=len(FRAME_COLORS)).argmax()
    return {"train_accuracy": round(100 * float((pred[~test] == y[~test]).float().mean()), 1),
            "test_accuracy": round(100 * float((pred[test] == y[test]).float().mean()), 1),
            "majority_baseline": round(100 * float((y[test] == majority).float().mean()), 1),
            "panels_train": int((~test).sum()), "panels_test": int(test.sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, help="model directories")
    p.add_argument("--random", action="store_true", help="also probe the BASE architecture with fresh weights")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-n", type=int, default=600, help="scenes (split 'probe', disjoint from train/val/test)")
    p.add_argument("--frame", type=float, default=0.05, help="panel frame width / shorter panel side")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from zoomworld_fast import fresh_model, load

    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    named = [(str(m), lambda m=m: load(m, device)) for m in args.models]
    if args.random:
        named.append(("random init (BASE architecture, seed 0)", lambda: fresh_model(ARCH, 0, device)))
    results, world = {}, None
    for name, get in named:
        model, processor = get()
        model.eval()
        if world is None:  # the same scenes for every model
            spec = WorldSpec(split="probe", frame_fraction=args.frame)
            world = build_world(spec, args.n, ("full",), processor, end_of_turn_id(model, processor), progress=False)
        t = time.perf_counter()
        x, y, scenes = panel_features(model, world, image_stats(processor), spec.size)
        results[name] = {**probe(x, y, scenes), "seconds": round(time.perf_counter() - t, 1)}
        print(f"{name}: frame colour from the panel's tokens {results[name]['test_accuracy']}% "
              f"(train {results[name]['train_accuracy']}%, majority {results[name]['majority_baseline']}%)", flush=True)
    (args.out / "probe.json").write_text(json.dumps({"scenes": args.n, "frame": args.frame, "results": results},
                                                    indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
