"""Issue 8: close the ZoomWorld gap from the BASE model with Vision-OPD variants (no labels).

    PYTHONPATH=src python benchmarks/zoomworld_opd.py --out runs/opd --base runs/zw/base \\
        --data /tmp/zoomworld/data --ceiling-results runs/zw/results.json --seconds 150 \\
        --variant plain=lr=1e-4 --variant frozen=lr=1e-4,teacher=frozen --seeds 0 1 2

Every variant x seed is one `zoomless train opd` run (student on the plain full image, teacher on
the crop), all started at once on the one GPU and each stopped at `--seconds` of wall time (the
last checkpoint is the result). Then `zoomless eval` (full and crop views) of each on val and test,
and per run: full- and crop-view accuracy, the gap, and the share of the gap closed relative to
the ceiling, (full after - full base) / (full ceiling - full base), with the base and ceiling
numbers read from the models run's results.json (same splits). Writes OUT/opd_results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoomworld_models import accuracy_table, eval_cmd, opd_cmd, parse_variant, run_all, step_times, summarize  # noqa: E402

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", type=Path, required=True, help="the BASE model directory")
    p.add_argument("--data", type=Path, required=True, help="folder with train/, val/, test/ (zoomworld_models)")
    p.add_argument("--ceiling-results", type=Path, required=True, help="results.json of zoomworld_models.py")
    p.add_argument("--work", type=Path, default=Path("/tmp/zoomworld-opd"))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--variant", action="append", required=True, help="name=key=value,key=value (OPD config overrides)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--seconds", type=float, default=150, help="wall budget of every run (all run at once)")
    a = p.parse_args()
    a.form = "open"  # eval_cmd reads it

    a.out.mkdir(parents=True, exist_ok=True)
    logs = a.out / "logs"
    logs.mkdir(exist_ok=True)
    shutil.rmtree(a.work, ignore_errors=True)
    variants = dict(parse_variant(v) for v in a.variant)
    runs = {f"{name}_seed{seed}": (seed, sets) for name, sets in variants.items() for seed in a.seeds}
    res: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "variants": variants}
    train = a.data / "train" / "train.jsonl"
    cmds = {f"train_{r}": opd_cmd(a.base, train, a.work / r, seed, sets, a.size) for r, (seed, sets) in runs.items()}
    res["train_wall"] = run_all(cmds, logs, a.seconds)

    from zoomless.train.common import last_checkpoint

    finals = {}
    for r in runs:
        if not (a.work / r / "metrics.jsonl").exists():
            raise SystemExit(f"{r} logged no step in {a.seconds}s:\n" + (logs / f"train_{r}.log").read_text()[-3000:])
        shutil.copy(a.work / r / "metrics.jsonl", logs / f"metrics_{r}.jsonl")
        res[f"step_seconds_{r}"] = step_times(a.work / r / "metrics.jsonl", skip=5)
        finals[r] = last_checkpoint(a.work / r)
    (a.out / "opd_results.json").write_text(json.dumps(res, indent=1))  # partial, in case eval fails

    splits = ("val", "test")
    evals = {f"eval_{r}_{s}": eval_cmd(finals[r], a.data / s / f"{s}.jsonl", a.out / f"eval_{r}_{s}", a)
             for r in runs for s in splits}
    res["eval_wall"] = run_all(evals, logs)
    acc = {r: {s: accuracy_table(a.out / f"eval_{r}_{s}" / "results.json") for s in splits} for r in runs}
    res["accuracy"] = acc
    models = json.loads(a.ceiling_results.read_text())["accuracy"]
    res["summary"] = {s: summarize(acc, models, s) for s in splits}
    for r, ckpt in finals.items():
        if runs[r][0] != a.seeds[0]:  # ship the first seed of each variant only (returned bytes are limited)
            continue
        dest = a.work / "ship" / r
        shutil.copytree(ckpt, dest, ignore=shutil.ignore_patterns("trainer_state.pt", "teacher"))
    (a.out / "opd_results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
