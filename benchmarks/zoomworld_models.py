"""Issue 7: train a crop-only BASE and a full-view CEILING ZoomWorld model from scratch on one GPU.

    PYTHONPATH=src python benchmarks/zoomworld_models.py --out runs/zw --size 224 --min-area 0.03 \
        --max-area 0.06 --form open --lr 3e-4 --base-seconds 240 --ceiling-seconds 240

1. ZoomWorld train / val / test splits with `zoomless world --workers` (fresh scenes: the training
   split is large enough that no scene is seen more than about twice).
2. A randomly initialised tiny Qwen2.5-VL (`build_tiny_vlm`) whose processor budget is one scene.
3. `zoomless train sft` runs, each stopped at its wall budget (the last checkpoint is the result):
   BASE on the crop view only, and at the same time CEILING-SCRATCH on a full-view mix; then
   CEILING (from BASE) on the full-view mix, a zoom-out curriculum in two steps.
4. `zoomless eval` (dual view: full and crop) of every final checkpoint on val and test.
5. `results.json`: data rate, step times (median of the logged phases), accuracies per dimension.

`--profile` also runs a few steps under torch.profiler and prints what dominates a step.
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
from pathlib import Path


# ----------------------------------------------------------------------------- data


def make_split(root: Path, split: str, n: int, a: argparse.Namespace) -> tuple[Path, float]:
    """root/<split>/<split>.jsonl with images/ beside it, by the CLI; returns (path, seconds)."""
    t0 = time.perf_counter()
    folder = root / split
    subprocess.run(zoomless(
        "world", str(folder), "--split", split, "--n", str(n), "--seed", str(a.seed), "--size", str(a.size),
        "--min-area-fraction", str(a.min_area), "--max-area-fraction", str(a.max_area),
        "--workers", str(os.cpu_count() or 1), "--no-sheet",
    ), check=True, stdout=subprocess.DEVNULL)
    return folder / f"{split}.jsonl", time.perf_counter() - t0


# ----------------------------------------------------------------------------- train and eval


def zoomless(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoomless.cli", *args]


def train_cmd(model: Path, data: Path, out: Path, view: str, a: argparse.Namespace) -> list[str]:
    sets = {
        "model_dir": model, "data": data, "out_dir": out, "view": view, "seed": a.seed,
        "max_steps": a.steps, "batch_size": a.batch, "micro_batch_size": a.batch, "lr": a.lr,
        "warmup_steps": a.warmup, "weight_decay": 0.01, "grad_clip": 1.0, "max_pixels": a.size * a.size,
        "crop_margin": 0.25, "form": a.form, "data_workers": a.workers, "log_every": 10,
        "save_every": a.save_every, "tensorboard": "false", "progress": "false",
    }
    return zoomless("train", "sft", *[x for k, v in sets.items() for x in ("--set", f"{k}={v}")])


def eval_cmd(model: Path, data: Path, out: Path, a: argparse.Namespace) -> list[str]:
    return zoomless(
        "eval", str(model), str(data), "--out", str(out), "--views", "full,crop", "--form", a.form,
        "--max-pixels", str(a.size * a.size), "--batch-size", "100", "--max-new-tokens", "8", "--no-chart",
    )


def run_all(cmds: dict[str, list[str]], logs: Path, budget_s: float | None = None) -> dict[str, dict]:
    """Run the commands at the same time, each one's output to logs/<name>.log. With `budget_s`, a
    command still running then is killed with its process group (checkpoints are written
    atomically, so the last complete one is the result; an interrupt took up to 30 s to end a run
    with data workers). Returns seconds and whether each one was stopped."""
    t0 = time.perf_counter()
    procs = {}
    for name, cmd in cmds.items():
        f = (logs / f"{name}.log").open("w")
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        # Several runs at once: each one's intra-op threads share the cores. Without a cap every run
        # started one thread per core and the runs thrashed (a 5M-model OPD step took 28 s).
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (2 * len(cmds))))}
        procs[name] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env), f)
    out = {}
    for name, (p, f) in procs.items():
        left = None if budget_s is None else max(1.0, budget_s - (time.perf_counter() - t0))
        stopped = False
        try:
            rc = p.wait(timeout=left)
        except subprocess.TimeoutExpired:
            stopped = True
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
    key = "loss" if "loss" in rows[-1] else "jsd"  # SFT logs a loss, Vision-OPD its divergence
    last = [r[key] for r in rows if key in r][-5:]
    out[f"final_{key}_mean_last_5_logs"] = round(statistics.mean(last), 4) if last else None
    return out


def accuracy_table(results: Path) -> dict:
    r = json.loads(results.read_text())
    views = {v: {d: round(a["acc"], 4) for d, a in r["views"][v]["accuracy"].items()} for v in r["views"]}
    gap = {d: round(g["gap"], 4) for d, g in (r["gap"] or {}).items()}
    n = r["views"]["full"]["accuracy"]["all"]["n"]
    return {"n": n, **views, "gap": gap}


# ----------------------------------------------------------------------------- Vision-OPD from BASE (issue 8)

# Defaults for a ZoomWorld run of the tiny model: short open answers, the base's own pixel budget.
OPD_DEFAULTS = {
    "student_view": "full", "teacher_view": "crop", "form": "open", "n": 4, "max_new_tokens": 8,
    "temperature": 1.0, "topk": 50, "batch_size": 64, "micro_batch_size": 256, "rollout_batch_size": 256,
    "warmup_steps": 10, "teacher": "ema", "ema_rate": 0.05, "log_every": 1, "save_every": 10,
    "tensorboard": "false", "progress": "false",
}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'name=key=value,key=value' -> (name, {key: value}) (commas: the shell keeps it one word)."""
    name, _, sets = text.partition("=")
    return name, dict(kv.split("=", 1) for kv in sets.split(",") if kv)


def opd_cmd(model: Path, data: Path, out: Path, seed: int, sets: dict[str, str], size: int) -> list[str]:
    cfg = {**OPD_DEFAULTS, "model_dir": model, "data": data, "out_dir": out, "seed": seed, "max_steps": 100000,
           "max_pixels": size * size, **sets}
    return zoomless("train", "opd", *[x for k, v in cfg.items() for x in ("--set", f"{k}={v}")])


def gap_closed(full_after: float, full_base: float, full_ceiling: float) -> float | None:
    room = full_ceiling - full_base
    return None if room <= 0 else (full_after - full_base) / room


def summarize(acc: dict, models: dict, split: str) -> dict:
    """Mean and spread over seeds of full, crop, gap and gap closed, per variant."""
    base, ceil = models[f"base_{split}"], models[f"ceiling_{split}"]
    out = {}
    for name in sorted({k.rsplit("_seed", 1)[0] for k in acc if "_seed" in k}):
        rows = [v[split] for k, v in acc.items() if k.rsplit("_seed", 1)[0] == name]
        per = {
            "full": [r["full"]["all"] for r in rows],
            "crop": [r["crop"]["all"] for r in rows],
            "closed": [gap_closed(r["full"]["all"], base["full"]["all"], ceil["full"]["all"]) for r in rows],
        }
        out[name] = {k: {"mean": round(statistics.mean(v), 4), "sd": round(statistics.pstdev(v), 4), "runs": v}
                     for k, v in per.items() if None not in v}
        out[name]["crop_change"] = round(out[name]["crop"]["mean"] - base["crop"]["all"], 4)
    return out



# ----------------------------------------------------------------------------- profile


def profile_steps(model: Path, data: Path, a: argparse.Namespace, view: str) -> dict:
    """Step phases with and without data workers, and the torch.profiler top ops of 3 steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from zoomless.train.common import Timer, start_run
    from zoomless.train.config import SFTConfig
    from zoomless.train.sft import BatchFeed, data_pool, sft_step

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    report = {}
    for workers in (0, a.workers_profile):
        cfg = SFTConfig(
            model_dir=model, data=data, out_dir=a.work / f"profile-{view}-{workers}", view=view, max_steps=100, form=a.form,
            batch_size=a.batch, micro_batch_size=a.batch, lr=a.lr, max_pixels=a.size * a.size,
            data_workers=workers, tensorboard=False, progress=False,
        )
        run = start_run(cfg)
        with data_pool(cfg, run) as pool:
            feed = BatchFeed(cfg, run, pool)
            for step in range(1, 4):  # warm-up
                sft_step(cfg, run, step, Timer(), feed)
            timer = Timer()
            sync()
            t0 = time.perf_counter()
            for step in range(4, 9):
                sft_step(cfg, run, step, timer, feed)
            sync()
            per = {k: round(v / 5, 4) for k, v in timer.seconds.items()}
            per["wall"] = round((time.perf_counter() - t0) / 5, 4)
            report[f"workers={workers}"] = per
            if workers:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for step in range(9, 12):
                        sft_step(cfg, run, step, Timer(), feed)
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
    p.add_argument("--size", type=int, default=224, help="scene side in pixels (also every view's pixel budget)")
    p.add_argument("--min-area", type=float, default=0.03, help="smallest evidence panel, fraction of the scene")
    p.add_argument("--max-area", type=float, default=0.06, help="largest evidence panel, fraction of the scene")
    p.add_argument("--train-n", type=int, default=60000)
    p.add_argument("--val-n", type=int, default=300)
    p.add_argument("--test-n", type=int, default=600)
    p.add_argument("--model-size", default="small")
    p.add_argument("--form", choices=["open", "mcq"], default="open")
    p.add_argument("--steps", type=int, default=100000, help="max_steps of each run (the wall budget stops it first)")
    p.add_argument("--base-seconds", type=float, default=240, help="wall budget of BASE (crop view)")
    p.add_argument("--ceiling-seconds", type=float, default=240, help="wall budget of CEILING (from BASE)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--workers", type=int, default=14, help="data workers of each training")
    p.add_argument("--workers-profile", type=int, default=14)
    p.add_argument("--ceiling-view", default="{full: 0.75, crop: 0.25}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--opd-variant", action="append", default=[],
                   help="name=key=value,key=value: a Vision-OPD run from BASE, trained alongside CEILING")
    p.add_argument("--opd-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ceiling-workers", type=int, default=6, help="data workers of CEILING (it shares the CPUs)")
    a = p.parse_args()

    from zoomless.models.tiny import build_tiny_vlm, count_parameters

    a.out.mkdir(parents=True, exist_ok=True)
    logs = a.out / "logs"
    logs.mkdir(exist_ok=True)
    shutil.rmtree(a.work, ignore_errors=True)
    res: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "cpus": os.cpu_count()}

    data = {}
    for split, n in (("train", a.train_n), ("val", a.val_n), ("test", a.test_n)):
        data[split], sec = make_split(a.work / "data", split, n, a)
        res[f"data_{split}"] = {"n": n, "seconds": round(sec, 1), "samples_per_s": round(n / sec, 1)}
        print(f"{split}: {n} samples in {sec:.1f}s", flush=True)

    init = build_tiny_vlm(a.work / "init", family="qwen2_5_vl", size=a.model_size, seed=a.seed,
                          max_pixels=a.size * a.size)
    import torch
    from transformers import AutoModelForImageTextToText
    res["params"] = count_parameters(AutoModelForImageTextToText.from_pretrained(init))
    res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    if a.profile:
        res["profile"] = {v: profile_steps(init, data["train"], a, v) for v in ("full", "crop")}
        print(json.dumps(res["profile"], indent=1), flush=True)

    from zoomless.train.common import last_checkpoint

    # BASE sees crops only: it stands for a pretrained model that reads a detail once it is shown
    # large and alone. CEILING starts from BASE and is trained with full-view labels (zoom-out).
    res["views"] = {"base": "crop", "ceiling": a.ceiling_view}
    res["train_wall"] = run_all({"train_base": train_cmd(init, data["train"], a.work / "base", "crop", a)}, logs,
                                a.base_seconds)
    base = last_checkpoint(a.work / "base")
    # CEILING and the Vision-OPD runs all start from BASE: they train at the same time.
    a.workers = a.ceiling_workers
    later = {"ceiling": train_cmd(base, data["train"], a.work / "ceiling", a.ceiling_view, a)}
    variants = dict(parse_variant(v) for v in a.opd_variant)
    res["opd_variants"], res["opd_defaults"] = variants, OPD_DEFAULTS
    for name, sets in variants.items():
        for seed in a.opd_seeds:
            later[f"{name}_seed{seed}"] = opd_cmd(base, data["train"], a.work / f"{name}_seed{seed}", seed, sets, a.size)
    res["train_wall"] |= run_all({f"train_{r}": c for r, c in later.items()}, logs, a.ceiling_seconds)
    runs = ("base", *later)
    finals = {}
    for m in runs:
        if not (a.work / m / "metrics.jsonl").exists():
            print(f"{m} logged no step:\n" + (logs / f"train_{m}.log").read_text()[-3000:], flush=True)
            continue
        shutil.copy(a.work / m / "metrics.jsonl", logs / f"metrics_{m}.jsonl")
        res[f"step_seconds_{m}"] = step_times(a.work / m / "metrics.jsonl", skip=5)
        finals[m] = last_checkpoint(a.work / m)
    print(json.dumps({k: res[k] for k in res if k.startswith(("step_", "train_"))}, indent=1), flush=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1))  # partial, in case eval fails

    finals = {m: c for m, c in finals.items() if c is not None}
    res["checkpoints"] = {m: str(c) for m, c in finals.items()}
    evals = {f"eval_{m}_{s}": eval_cmd(finals[m], data[s], a.out / f"eval_{m}_{s}", a)
             for m in finals for s in ("val", "test")}
    res["eval_wall"] = run_all(evals, logs)
    res["accuracy"] = {name[5:]: accuracy_table(a.out / name / "results.json") for name in evals}
    if variants and "ceiling" in finals:
        opd_acc = {m: {s: res["accuracy"][f"{m}_{s}"] for s in ("val", "test")} for m in finals if "_seed" in m}
        res["opd_summary"] = {s: summarize(opd_acc, res["accuracy"], s) for s in ("val", "test")}

    for m, ckpt in finals.items():  # the shippable model: the HF directory without optimizer state
        if "_seed" in m and not m.endswith(f"_seed{a.opd_seeds[0]}"):
            continue  # one seed of each OPD variant (the bytes that come back from the GPU are limited)
        dest = a.work / "ship" / m
        shutil.copytree(ckpt, dest, ignore=shutil.ignore_patterns("trainer_state.pt", "teacher"))
        res[f"model_bytes_{m}"] = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: {s: v[s]["all"] for s in ("full", "crop", "gap")} for k, v in res["accuracy"].items()}, indent=1))
    print(json.dumps(res.get("opd_summary"), indent=1))


if __name__ == "__main__":
    main()
