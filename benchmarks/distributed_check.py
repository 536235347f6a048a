"""Does data parallelism change the step? One Vision-OPD step and one GRPO step on a fixed batch,
on 1 process and on N processes (accelerate launch), and the largest differences in the loss, the
gradient norm and the updated weights (student, and the EMA teacher).

    # N GPUs of one host, DDP (default) or FSDP2; fp32 by default so the comparison is exact up to rounding
    PYTHONPATH=src python benchmarks/distributed_check.py --out /tmp/dcheck --processes 2
    PYTHONPATH=src python benchmarks/distributed_check.py --out /tmp/dcheck --processes 2 \\
        --accelerate-config configs/accelerate/fsdp2.yaml
    # CPU, tiny model, 2 processes over gloo (a smoke test of the script itself; FSDP2 emulated on CPU
    # with --accelerate-config configs/accelerate/fsdp2.yaml)
    PYTHONPATH=src python benchmarks/distributed_check.py --out /tmp/dcheck --tiny

The rollouts come from a fixed engine (the same responses for a prompt whichever process asks;
`distributed_common.FixedEngine`), so both runs distill and reward the same global batch; GRPO
runs one mini-batch and one update, where the N-process step equals the 1-process step exactly.
A last N-process OPD step samples with the real HF engine (under FSDP from gathered weights):
it checks that sampling runs, not that it matches (each process samples with its own seed).

Writes OUT/check.json and the runs under OUT/run-1, OUT/run-N (each with its launcher's output in
launch.log, and a failed process's traceback in error-rank{R}.txt). Disk: two fp32 checkpoints per run
(the 3B shape needs ~60 GB; the default `base` shape a few hundred MB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_common as dc  # noqa: E402

RECIPES = ("opd", "grpo")


def configs(a: argparse.Namespace, model: Path, data: Path, out: Path) -> dict:
    from zoomless.train.config import GRPOConfig, OPDConfig

    common = dict(
        model_dir=model, data=data, lr=1e-4, warmup_steps=0, max_steps=1, batch_size=a.batch, n=a.rollouts,
        micro_batch_size=a.micro, max_pixels=a.max_pixels, max_new_tokens=8, tensorboard=False, progress=False,
        dtype=a.dtype, device="cpu" if a.cpu else "auto", seed=0,
    )
    return {
        "opd": OPDConfig(out_dir=out / "opd", topk=a.topk, **common),
        "grpo": GRPOConfig(out_dir=out / "grpo", mini_batches=1, updates_per_batch=1, **common),
    }


def worker(a: argparse.Namespace) -> None:
    """Inside accelerate launch: one step of each recipe on the fixed batch (plus, on N processes,
    one OPD step sampled by the HF engine)."""
    from zoomless.train.grpo import train_grpo
    from zoomless.train.opd import train_opd

    cfgs = configs(a, a.model, a.data, a.run_dir)
    engine = lambda model, processor: dc.FixedEngine(processor, a.response_len)  # noqa: E731
    train_opd(cfgs["opd"], make_engine=engine)
    train_grpo(cfgs["grpo"], make_engine=engine)
    if a.sample:
        train_opd(cfgs["opd"].model_copy(update={"out_dir": a.run_dir / "opd-sampled"}))


def final_weights(path: Path) -> dict[str, torch.Tensor]:
    from zoomless.models.loading import load_vlm

    model, _ = load_vlm(path, dtype=torch.float32, device="cpu")
    return {n: p.detach() for n, p in model.named_parameters()}


def weight_diffs(one: Path, many: Path, base: dict[str, torch.Tensor]) -> dict[str, float]:
    a, b = final_weights(one), final_weights(many)
    return {
        "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
        "relative_diff": sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5
        / sum(float(a[k].double().pow(2).sum()) for k in a) ** 0.5,
        "step_moved_max": max(float((a[k] - base[k]).abs().max()) for k in a),
    }


def metrics(run: Path, recipe: str) -> dict:
    return json.loads((run / recipe / "metrics.jsonl").read_text().splitlines()[0])


def compare(a: argparse.Namespace, one: Path, many: Path) -> dict:
    base = final_weights(a.model)
    report: dict = {}
    for recipe in RECIPES:
        m1, mn = metrics(one, recipe), metrics(many, recipe)
        keys = ("jsd", "grad_norm", "tokens") if recipe == "opd" else ("pg_loss", "reward", "grad_norm", "tokens")
        entry = {k: {"1": m1[k], str(a.processes): mn[k], "rel_diff": abs(m1[k] - mn[k]) / max(abs(m1[k]), 1e-30)}
                 for k in keys}
        ckpt = "checkpoint-000001"
        entry["student"] = weight_diffs(one / recipe / ckpt, many / recipe / ckpt, base)
        if recipe == "opd":
            entry["teacher"] = weight_diffs(one / recipe / ckpt / "teacher", many / recipe / ckpt / "teacher", base)
        report[recipe] = entry
    if a.sample:
        report["opd_sampled"] = metrics(many, "opd-sampled")
    return report


def show(report: dict, processes: int) -> None:
    for recipe in RECIPES:
        print(f"\n== {recipe}: 1 process vs {processes}")
        for k, v in report[recipe].items():
            if "rel_diff" in v:
                print(f"  {k:10s} {v['1']:.8g}  vs  {v[str(processes)]:.8g}   relative difference {v['rel_diff']:.2e}")
            else:
                print(f"  {k:10s} max |w1 - wN| {v['max_abs_diff']:.2e}   ||w1 - wN|| / ||w1|| {v['relative_diff']:.2e}"
                      f"   (the step itself moved weights by up to {v['step_moved_max']:.2e})")
    if "opd_sampled" in report:
        m = report["opd_sampled"]
        print(f"\n== opd, sampled by the HF engine on {processes} processes: rollouts {m['rollouts']:.0f}, "
              f"tokens {m['tokens']:.0f}, jsd {m.get('jsd', float('nan')):.4g}, skipped {m.get('skipped', 0):.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--processes", type=int, default=None, help="N (default: the GPU count, 2 on CPU)")
    p.add_argument("--accelerate-config", type=Path, default=None, help="for the N-process run, e.g. FSDP2")
    p.add_argument("--shape", choices=dc.SHAPES, default="base", help="model shape (random weights)")
    p.add_argument("--tiny", action="store_true", help="CPU, shape 'test', small images: a smoke test")
    p.add_argument("--cpu", action="store_true", help="run on CPU processes over gloo")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    p.add_argument("--batch", type=int, default=8, help="prompts per step (a multiple of N)")
    p.add_argument("--rollouts", type=int, default=4, help="rollouts per prompt (n)")
    p.add_argument("--micro", type=int, default=4, help="sequences per forward/backward")
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--response-len", type=int, default=24, help="filler tokens after the answer")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--max-pixels", type=int, default=448 * 448)
    p.add_argument("--no-sample", dest="sample", action="store_false", help="skip the sampled OPD step")
    p.add_argument("--compare-only", action="store_true", help="compare the runs already in --out")
    # set when this script runs itself under accelerate launch
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.tiny:
        a.cpu, a.shape, a.max_pixels = True, "test", 112 * 112
    if a.worker:
        if a.cpu and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            dc.emulate_fsdp_on_cpu()
        with dc.failure_log(a.run_dir):
            return worker(a)

    a.processes = a.processes or (2 if a.cpu or not torch.cuda.is_available() else torch.cuda.device_count())
    a.cpu = a.cpu or not torch.cuda.is_available()
    a.model = dc.build_model(a.out / "model", a.shape)
    a.data = dc.build_data(a.out / "data", max(a.batch, 8), a.image_size)
    common = ["--worker", "--model", str(a.model), "--data", str(a.data), "--dtype", a.dtype,
              "--batch", str(a.batch), "--rollouts", str(a.rollouts), "--micro", str(a.micro), "--topk", str(a.topk),
              "--response-len", str(a.response_len), "--max-pixels", str(a.max_pixels), "--out", str(a.out)]
    common += ["--cpu"] if a.cpu else []
    one, many = a.out / "run-1", a.out / f"run-{a.processes}"
    if not a.compare_only:
        dc.launch(Path(__file__), 1, common + ["--run-dir", str(one), "--no-sample"], cpu=a.cpu,
                  log=one / "launch.log")
        sample = [] if a.sample else ["--no-sample"]
        dc.launch(Path(__file__), a.processes, common + ["--run-dir", str(many)] + sample, cpu=a.cpu,
                  accelerate_config=a.accelerate_config, log=many / "launch.log")
    report = {"processes": a.processes, "shape": a.shape, "dtype": a.dtype,
              "accelerate_config": str(a.accelerate_config) if a.accelerate_config else "ddp", **compare(a, one, many)}
    dc.write_json(a.out / "check.json", report)
    show(report, a.processes)


if __name__ == "__main__":
    main()
