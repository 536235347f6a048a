"""Issue 7 probe: train a crop-only BASE and a full-view CEILING ZoomWorld model from scratch on one GPU.

    PYTHONPATH=src python benchmarks/zoomworld_models.py --out runs/zw --train-n 30000 --steps 1500

1. ZoomWorld train / val / test splits, rendered in parallel over all cores into one JSONL each.
2. A randomly initialised tiny Qwen2.5-VL (`build_tiny_vlm`) whose processor budget is one scene.
3. Two `zoomless train sft` runs, at the same time on the one GPU or (--one-at-a-time) in turn:
   BASE on the crop view only, CEILING on a mix that favours the full view. With --train-seconds
   a run is stopped at its wall budget and its last checkpoint is evaluated.
4. `zoomless eval` (dual view: full and crop) of both final checkpoints on val and test.
5. `results.json`: data rate, step times (median of the logged phases), accuracies per dimension.

`--profile` also runs a few full-view steps under torch.profiler and prints what dominates a step.
Everything is seeded; the splits never share a scene (the split name is hashed into each seed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import shutil
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

from zoomless.sample import write_jsonl
from zoomless.world import generate_sample

# ----------------------------------------------------------------------------- data


def _render_range(job: tuple[str, Path, int, int, int, int]) -> list:
    split, folder, start, stop, size, seed = job
    out = []
    for i in range(start, stop):
        image, sample = generate_sample(i, split=split, seed=seed, size=size)
        image.save(folder / sample.image, format="PNG", compress_level=1)
        out.append(sample)
    return out


def make_split(root: Path, split: str, n: int, size: int, seed: int, procs: int) -> tuple[Path, float]:
    """root/<split>/<split>.jsonl with images/ beside it; returns (path, seconds)."""
    t0 = time.perf_counter()
    folder = root / split
    (folder / "images").mkdir(parents=True, exist_ok=True)
    step = max(1, -(-n // (procs * 8)))
    jobs = [(split, folder, a, min(a + step, n), size, seed) for a in range(0, n, step)]
    with Pool(procs) as pool:
        samples = [s for part in pool.imap(_render_range, jobs) for s in part]  # imap keeps index order
    path = write_jsonl(samples, folder / f"{split}.jsonl")
    return path, time.perf_counter() - t0


# ----------------------------------------------------------------------------- train and eval


def zoomless(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoomless.cli", *args]


def train_cmd(model: Path, data: Path, out: Path, view: str, a: argparse.Namespace) -> list[str]:
    sets = {
        "model_dir": model, "data": data, "out_dir": out, "view": view, "seed": a.seed,
        "max_steps": a.steps, "batch_size": a.batch, "micro_batch_size": a.batch, "lr": a.lr,
        "warmup_steps": a.warmup, "weight_decay": 0.01, "grad_clip": 1.0, "max_pixels": a.size * a.size,
        "crop_margin": 0.25, "form": "mcq", "data_workers": a.workers, "log_every": 10,
        "save_every": a.save_every, "tensorboard": "false", "progress": "false",
    }
    return zoomless("train", "sft", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")])


def eval_cmd(model: Path, data: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return zoomless(
        "eval", str(model), str(data), "--out", str(out), "--views", "full,crop", "--form", "mcq",
        "--max-pixels", str(a.size * a.size), "--batch-size", "100", "--max-new-tokens", "4", "--no-chart",
    )


def run_all(cmds: dict[str, list[str]], logs: Path, budget_s: float | None = None) -> dict[str, dict]:
    """Run the commands at the same time, each one's output to logs/<name>.log. With `budget_s`, a
    command still running then is interrupted (SIGINT: checkpoints are written atomically, so the
    last complete one is the result). Returns seconds and whether each one was stopped."""
    t0 = time.perf_counter()
    procs = {}
    for name, cmd in cmds.items():
        f = (logs / f"{name}.log").open("w")
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        procs[name] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True), f)
    out = {}
    for name, (p, f) in procs.items():
        left = None if budget_s is None else max(1.0, budget_s - (time.perf_counter() - t0))
        stopped = False
        try:
            rc = p.wait(timeout=left)
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(p.pid, signal.SIGINT)
            try:
                rc = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc = p.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # stray data workers
        f.close()
        out[name] = {"seconds": round(time.perf_counter() - t0, 1), "stopped_at_budget": stopped}
        if rc != 0 and not stopped:
            tail = (logs / f"{name}.log").read_text()[-3000:]
            raise SystemExit(f"{name} failed (exit {rc}):\n{tail}")
    return out


def step_times(metrics: Path, skip: int = 20) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if r["step"] > skip] or rows
    keys = [k for k in rows[0] if k.startswith("seconds/")]
    out = {k.split("/")[1]: round(statistics.median(r[k] for r in rows), 4) for k in keys}
    out["total"] = round(sum(out.values()), 4)
    out["steps_done"] = rows[-1]["step"]
    out["final_loss_mean_last_5_logs"] = round(statistics.mean(r["loss"] for r in rows[-5:]), 4)
    return out


def accuracy_table(results: Path) -> dict:
    r = json.loads(results.read_text())
    views = {v: {d: round(a["acc"], 4) for d, a in r["views"][v]["accuracy"].items()} for v in r["views"]}
    gap = {d: round(g["gap"], 4) for d, g in (r["gap"] or {}).items()}
    n = r["views"]["full"]["accuracy"]["all"]["n"]
    return {"n": n, **views, "gap": gap}


# ----------------------------------------------------------------------------- profile


def profile_steps(model: Path, data: Path, a: argparse.Namespace, view: str) -> dict:
    """Step phases with and without data workers, and the torch.profiler top ops of 3 steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from zoomless.train.common import Timer, start_run
    from zoomless.train.config import SFTConfig
    from zoomless.train.sft import data_pool, sft_step

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    report = {}
    for workers in (0, a.workers_profile):
        cfg = SFTConfig(
            model_dir=model, data=data, out_dir=a.work / f"profile-{view}-{workers}", view=view, max_steps=100,
            batch_size=a.batch, micro_batch_size=a.batch, lr=a.lr, max_pixels=a.size * a.size,
            data_workers=workers, tensorboard=False, progress=False,
        )
        run = start_run(cfg)
        with data_pool(cfg, run) as pool:
            for step in range(1, 4):  # warm-up
                sft_step(cfg, run, step, Timer(), pool)
            timer = Timer()
            sync()
            t0 = time.perf_counter()
            for step in range(4, 9):
                sft_step(cfg, run, step, timer, pool)
            sync()
            per = {k: round(v / 5, 4) for k, v in timer.seconds.items()}
            per["wall"] = round((time.perf_counter() - t0) / 5, 4)
            report[f"workers={workers}"] = per
            if workers:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for step in range(9, 12):
                        sft_step(cfg, run, step, Timer(), pool)
                    sync()
                for key in ("self_cpu_time_total", "self_cuda_time_total"):
                    table = prof.key_averages().table(sort_by=key, row_limit=15)
                    (a.out / "logs" / f"profile_{view}_{key}.txt").write_text(table)
                    print(f"\n== torch.profiler, 3 {view} steps, sorted by {key}\n{table}", flush=True)
        del run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results.json, logs and eval folders")
    p.add_argument("--work", type=Path, default=Path("/tmp/zoomworld"), help="scratch: data and checkpoints")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--train-n", type=int, default=30000)
    p.add_argument("--val-n", type=int, default=200)
    p.add_argument("--test-n", type=int, default=300)
    p.add_argument("--model-size", default="small")
    p.add_argument("--steps", type=int, default=1500, help="max_steps of each run")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="wall budget of the two (simultaneous) trainings; the last checkpoint is used")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--one-at-a-time", action="store_true",
                   help="train BASE then CEILING (each with --train-seconds) instead of both at once")
    p.add_argument("--vision-window", action=argparse.BooleanOptionalAction, default=True,
                   help="keep Qwen2.5-VL's windowed vision attention (--no-vision-window: every block global)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--workers", type=int, default=7, help="data workers of each of the two trainings")
    p.add_argument("--workers-profile", type=int, default=14)
    p.add_argument("--ceiling-view", default="{full: 0.75, crop: 0.25}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()

    from zoomless.models.tiny import build_tiny_vlm, count_parameters

    a.out.mkdir(parents=True, exist_ok=True)
    logs = a.out / "logs"
    logs.mkdir(exist_ok=True)
    shutil.rmtree(a.work, ignore_errors=True)
    procs = os.cpu_count() or 1
    res: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "cpus": procs}

    data = {}
    for split, n in (("train", a.train_n), ("val", a.val_n), ("test", a.test_n)):
        if n:
            data[split], sec = make_split(a.work / "data", split, n, a.size, a.seed, procs)
            res[f"data_{split}"] = {"n": n, "seconds": round(sec, 1), "samples_per_s": round(n / sec, 1)}
            print(f"{split}: {n} samples in {sec:.1f}s", flush=True)

    init = build_tiny_vlm(a.work / "init", family="qwen2_5_vl", size=a.model_size, seed=a.seed,
                          max_pixels=a.size * a.size)
    if not a.vision_window:
        # HF runs windowed attention as one SDPA call per 112-px window (1,024 per batch of 64 full
        # scenes per layer, forward and backward): the launches, not the math, dominated the step.
        # Global attention in every vision block (as in Qwen2-VL) is one call per image.
        cfg_path = init / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["vision_config"]["fullatt_block_indexes"] = list(range(cfg["vision_config"]["depth"]))
        cfg_path.write_text(json.dumps(cfg, indent=2))
    import torch
    from transformers import AutoModelForImageTextToText
    res["params"] = count_parameters(AutoModelForImageTextToText.from_pretrained(init))
    res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"

    if a.profile:
        res["profile"] = {v: profile_steps(init, data["train"], a, v) for v in ("full", "crop")}
        print(json.dumps(res["profile"], indent=1), flush=True)

    runs = {"base": "crop", "ceiling": a.ceiling_view}
    res["views"] = runs
    cmds = {f"train_{m}": train_cmd(init, data["train"], a.work / m, v, a) for m, v in runs.items()}
    if a.one_at_a_time:  # two trainings at once fought over the cores: each step was 2-5x slower
        res["train_wall"] = {k: run_all({k: c}, logs, a.train_seconds)[k] for k, c in cmds.items()}
    else:
        res["train_wall"] = run_all(cmds, logs, a.train_seconds)
    for m in runs:
        shutil.copy(a.work / m / "metrics.jsonl", logs / f"metrics_{m}.jsonl")
        res[f"step_seconds_{m}"] = step_times(a.work / m / "metrics.jsonl")
    print(json.dumps({k: res[k] for k in res if k.startswith(("step_", "train_"))}, indent=1), flush=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1))  # partial, in case eval fails

    from zoomless.train.common import last_checkpoint

    finals = {m: last_checkpoint(a.work / m) for m in runs}
    res["checkpoints"] = {m: str(c) for m, c in finals.items()}
    evals = {f"eval_{m}_{s}": eval_cmd(finals[m], data[s], a.out / f"eval_{m}_{s}", a)
             for m in runs for s in ("val", "test") if s in data}
    res["eval_wall"] = run_all(evals, logs)
    res["accuracy"] = {name[5:]: accuracy_table(a.out / name / "results.json") for name in evals}

    for m, ckpt in finals.items():  # the shippable model: the HF directory without optimizer state
        dest = a.work / "ship" / m
        shutil.copytree(ckpt, dest, ignore=shutil.ignore_patterns("trainer_state.pt"))
        res[f"model_bytes_{m}"] = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["accuracy"], indent=1))


if __name__ == "__main__":
    main()
