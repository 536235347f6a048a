"""Does the EMA teacher's bf16 copy (`teacher_dtype: bfloat16`, stochastically rounded updates)
change what Vision-OPD learns? The demo's setting on a CPU, from the shipped ZoomWorld BASE: the
student on the full image, the EMA teacher (rate 0.05) on the crop, `--steps` steps at lr 1e-4,
for each teacher dtype and seed; then the full and crop views of `--test-n` test scenes.
`--compute bfloat16` runs both models under bf16 autocast, as on a GPU (an fp32 teacher's weights
are then rounded to bf16 for each matmul); with float32 (the CPU's default) a bf16 teacher also
computes in bf16, a harsher test.

    PYTHONPATH=src python benchmarks/teacher_dtype_study.py --out /tmp/tds   # ~18 minutes on 2 cores

Writes results.json (per run: steps, seconds, test accuracy per view, the last logged JSD) and
results.md (mean and spread per dtype).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from zoomless import demo
from zoomless.sample import read_samples
from zoomless.train.config import OPDConfig
from zoomless.train.opd import train_opd


def distill(model_dir: Path, train: Path, out: Path, steps: int, seed: int, dtype: str, compute: str) -> Path:
    cfg = OPDConfig(
        model_dir=model_dir, data=train, out_dir=out, student_view="full", teacher_view="crop", form="open",
        n=4, max_new_tokens=8, topk=50, batch_size=8, micro_batch_size=32, rollout_batch_size=32, lr=1e-4,
        warmup_steps=5, teacher="ema", ema_rate=0.05, teacher_dtype=dtype, max_steps=steps, save_every=0,
        log_every=10, max_pixels=demo.SIZE * demo.SIZE, device="cpu", dtype=compute, tensorboard=False,
        progress=False, seed=seed,
    )
    return train_opd(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--test-n", type=int, default=120)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--compute", choices=("float32", "bfloat16"), default="float32", help="the run's compute dtype")
    p.add_argument("--dtypes", default="float32,bfloat16", help="the teacher dtypes to run, comma-separated")
    a = p.parse_args()
    base = demo.shipped_model_dir()
    if base is None:
        raise SystemExit("needs the shipped ZoomWorld BASE (src/zoomless/assets/zoomworld-base)")
    test = read_samples(demo._world(a.out, "test", a.test_n))
    train = demo._world(a.out, "train", 8 * a.steps)
    scores = lambda r: {v: round(100 * r.accuracy(v)["all"].acc, 2) for v in ("full", "crop")}
    base_scores = scores(demo._dual_view(test, base, a.out / "eval-base", "base"))
    runs = []
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        for dtype in a.dtypes.split(","):
            name = f"{dtype}-s{seed}"
            t = time.perf_counter()
            final = distill(base, train, a.out / name, a.steps, seed, dtype, a.compute)
            seconds = time.perf_counter() - t
            result = demo._dual_view(test, final, a.out / f"eval-{name}", name)
            acc = scores(result)
            last = json.loads((a.out / name / "metrics.jsonl").read_text().splitlines()[-1])
            runs.append({"dtype": dtype, "seed": seed, "train_seconds": round(seconds, 1), **acc, "last_jsd": last["jsd"]})
            print(runs[-1], flush=True)
            (a.out / "results.json").write_text(json.dumps({"steps": a.steps, "test_n": a.test_n, "compute": a.compute,
                                                            "base": base_scores, "runs": runs}, indent=2))
    lines = [f"# EMA teacher fp32 vs bf16, {a.steps} Vision-OPD steps from the ZoomWorld BASE, {a.test_n} test "
             f"scenes, {a.compute} compute",
             "", "| teacher dtype | full (mean, per seed) | crop (mean, per seed) | train s |", "|---|---|---|---:|",
             f"| BASE (before training) | {base_scores['full']} | {base_scores['crop']} | |"]
    for dtype in a.dtypes.split(","):
        rs = [r for r in runs if r["dtype"] == dtype]
        cell = lambda v: f"{statistics.fmean(r[v] for r in rs):.1f} ({', '.join(str(r[v]) for r in rs)})"
        lines.append(f"| {dtype} | {cell('full')} | {cell('crop')} | {statistics.fmean(r['train_seconds'] for r in rs):.0f} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
