"""Vision-OPD training throughput on 1 GPU and on N GPUs, for the same global batch.

    # Qwen2.5-VL-3B-shaped model (random weights), 16 prompts x 4 rollouts per step, 1 vs 2 GPUs (FSDP2)
    PYTHONPATH=src python benchmarks/distributed_throughput.py --out /tmp/tput --work /tmp/tput-work \\
        --processes 2 --accelerate-config configs/accelerate/fsdp2.yaml --warmup 1 --steps 3
    # only the 2-GPU run, against a 1-GPU step time measured before (18.6 s on one H200)
    ... --skip-baseline --baseline-seconds 18.6
    # CPU smoke test of the script: tiny model, 2 processes over gloo (FSDP2 emulated on CPU)
    PYTHONPATH=src python benchmarks/distributed_throughput.py --out /tmp/tput --tiny \\
        --accelerate-config configs/accelerate/fsdp2.yaml

A step is what `zoomless train opd` runs, minus sampling and checkpoints: render and encode the
prompts, the student's teacher-forced forward and backward, the EMA teacher's forward on the crop,
the optimizer step and the EMA update, on `--batch` prompts x `--rollouts` responses of
`--response-len` tokens from a fixed engine (sampling is left out: it is not what data parallelism
changes). With N processes each one takes batch/N prompts. Timed after `--warmup` steps, with
CUDA synchronised around each step.

Memory: the 3B shape trains fp32 weights with AdamW and an fp32 EMA teacher, 3.75B x (4 + 4 + 8 + 4)
bytes = 75 GB before activations on the 1-GPU baseline (and on every GPU under DDP): run it on
H200s, or with `--teacher student` (60 GB), or compare FSDP2 runs only. Under FSDP2 each of N GPUs
holds 1/N of that.

Prints, for 1 and N processes: seconds per step, response tokens/s and sequence tokens/s (prompt
with its image tokens + response), peak GPU memory; then the speed-up and its efficiency
(speed-up / N). Writes OUT/throughput.json, also when a run fails: that run then holds the error
and each failed process's traceback. Each run's whole output is in OUT/run-K/launch.log, and a
failed process's traceback in OUT/run-K/error-rank{R}.txt. `--work` keeps the model (7.5 GB at 3B)
and the data out of OUT. The exit status is 1 if a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_common as dc  # noqa: E402

TAIL = 6000  # characters of a traceback or log kept in throughput.json
# --tiny: a CPU smoke test of the script
TINY = dict(cpu=True, shape="test", batch=4, rollouts=2, micro=2, response_len=16, image_size=448,
            max_pixels=112 * 112, warmup=1, steps=2)


def worker(a: argparse.Namespace) -> None:
    """Inside the launcher: time `--steps` OPD steps after `--warmup`; the main process writes JSON."""
    from zoomless.models.loading import vision_token_ids
    from zoomless.train.batching import encode_prompt
    from zoomless.train.common import start_run
    from zoomless.train.config import OPDConfig
    from zoomless.train.distributed import fsdp_units
    from zoomless.train.metrics import Timer
    from zoomless.train.opd import opd_step, setup_teacher, view_kwargs
    from zoomless.train.views import view_conversation

    cfg = OPDConfig(
        model_dir=a.model, data=a.data, out_dir=a.run_dir, batch_size=a.batch, n=a.rollouts,
        micro_batch_size=a.micro, topk=a.topk, max_pixels=a.max_pixels, gradient_checkpointing=a.gc,
        dtype=a.dtype, device="cpu" if a.cpu else "auto", lr=1e-6, warmup_steps=0, teacher=a.teacher,
        max_steps=a.warmup + a.steps, tensorboard=False, progress=False,
    )
    run = start_run(cfg)
    teacher, _ = setup_teacher(cfg, run)
    engine = dc.FixedEngine(run.processor, a.response_len)
    banned = vision_token_ids(run.processor)
    cuda = run.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seconds, tokens, phases = [], [], {}
    for step in range(1, a.warmup + a.steps + 1):
        if cuda and step == a.warmup + 1:
            torch.cuda.reset_peak_memory_stats()
        timer = Timer()
        sync()
        t0 = time.perf_counter()
        metrics = opd_step(cfg, run, teacher, engine, banned, step, timer)
        sync()
        if step > a.warmup:
            seconds.append(time.perf_counter() - t0)
            tokens.append(metrics["tokens"])
            for k, v in timer.seconds.items():
                phases[k] = phases.get(k, 0.0) + v / a.steps
    # prompt tokens (image tokens included) of the samples in the run, for the sequence throughput
    prompts = [encode_prompt(run.processor, view_conversation(s, cfg.student_view, **view_kwargs(cfg)))
               for s in run.samples[: a.batch]]
    prompt_len = statistics.mean(len(p.input_ids) for p in prompts)
    peak = run.dist.max({"peak": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0})["peak"]
    # every process measured its own wall time: the step is as slow as the slowest process
    step_s = run.dist.max({"s": statistics.median(seconds)})["s"]
    if run.dist.is_main:
        response_tokens = statistics.mean(tokens)
        dc.write_json(a.run_dir / "throughput.json", {
            "processes": run.dist.world, "seconds_per_step": step_s, "response_tokens_per_step": response_tokens,
            "prompt_tokens_per_sequence": prompt_len,
            "response_tokens_per_s": response_tokens / step_s,
            "sequence_tokens_per_s": (response_tokens + a.batch * a.rollouts * prompt_len) / step_s,
            "peak_memory_gib": peak, "phases_main_process": phases,
            "fsdp_units": len(fsdp_units(run.policy)),
        })


def launch_run(a: argparse.Namespace, n: int, args: list[str]) -> dict:
    """The n-process run's OUT/run-n/throughput.json; if the run fails, the error instead, with each
    failed process's traceback (OUT/run-n/error-rank*.txt) or else the end of the launcher's log
    (OUT/run-n/launch.log holds all of it)."""
    run_dir = a.out / f"run-{n}"
    result, log = run_dir / "throughput.json", run_dir / "launch.log"
    for stale in [result, *run_dir.glob("error-rank*.txt")]:
        stale.unlink(missing_ok=True)
    try:
        dc.launch(Path(__file__), n, args + ["--run-dir", str(run_dir)], cpu=a.cpu,
                  accelerate_config=a.accelerate_config if n > 1 else None, log=log, timeout=a.run_timeout)
        error = None if result.exists() else "the launcher exited with status 0 but wrote no result"
    except subprocess.CalledProcessError as e:
        error = f"the launcher exited with status {e.returncode}"
    except subprocess.TimeoutExpired:
        error = f"stopped after --run-timeout {a.run_timeout:g} s"
    if error is None:
        return json.loads(result.read_text())
    failed = {"processes": n, "error": error, "log": str(log)}
    tracebacks = {f.stem: f.read_text()[-TAIL:] for f in sorted(run_dir.glob("error-rank*.txt"))}
    if tracebacks:
        failed["tracebacks"] = tracebacks
    else:  # killed (out of memory, a signal, the timeout) before Python could report
        failed["log_tail"] = log.read_text()[-TAIL:]
    return failed


def baseline(a: argparse.Namespace, args: list[str]) -> dict | None:
    """The 1-process run: launched, or with --skip-baseline the one given (--baseline-seconds), or
    the one an earlier call left in OUT/run-1 (None if neither)."""
    if not a.skip_baseline:
        return launch_run(a, 1, args)
    if a.baseline_seconds is not None:
        return {"processes": 1, "seconds_per_step": a.baseline_seconds, "source": "--baseline-seconds"}
    saved = a.out / "run-1" / "throughput.json"
    return {**json.loads(saved.read_text()), "source": str(saved)} if saved.exists() else None


def show(a: argparse.Namespace, runs: dict[str, dict], speedup: float | None) -> None:
    print(f"\nVision-OPD step, shape {a.shape}, {a.batch} prompts x {a.rollouts} responses of ~{a.response_len} tokens")
    for n, r in runs.items():
        name = f"{n} process{'es' if n != '1' else '  '}"
        if "error" in r:
            print(f"  {name}: FAILED, {r['error']}; see {r['log']}")
        elif "peak_memory_gib" not in r:
            print(f"  {name}: {r['seconds_per_step']:.3f} s/step (from {r['source']})")
        else:
            print(f"  {name}: {r['seconds_per_step']:.3f} s/step  {r['response_tokens_per_s']:.0f} response tok/s  "
                  f"{r['sequence_tokens_per_s']:.0f} sequence tok/s  peak {r['peak_memory_gib']:.1f} GiB")
    if speedup is not None:
        print(f"  speed-up {speedup:.2f}x on {a.processes} (efficiency {speedup / a.processes:.0%})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results: throughput.json, run-1/, run-N/ (logs)")
    p.add_argument("--work", type=Path, default=None, help="where the model and data are built (default: --out)")
    p.add_argument("--processes", type=int, default=2, help="N, compared with 1")
    p.add_argument("--accelerate-config", type=Path, default=None, help="for the N-process run, e.g. FSDP2")
    p.add_argument("--skip-baseline", action="store_true",
                   help="run only the N-process run; the 1-process numbers from --baseline-seconds or OUT/run-1")
    p.add_argument("--baseline-seconds", type=float, default=None,
                   help="with --skip-baseline: seconds per step of the 1-process run, measured before")
    p.add_argument("--baseline-only", action="store_true", help="run only the 1-process run (no FSDP)")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds each launched run may take; past them it is stopped and recorded as failed")
    p.add_argument("--shape", choices=dc.SHAPES, default=None,
                   help="model shape, random weights (default: qwen2.5-vl-3b; with --tiny: test)")
    p.add_argument("--tiny", action="store_true",
                   help="CPU, shape 'test', small images and batch (defaults: options given still apply)")
    p.add_argument("--cpu", action="store_true", help="run on CPU processes over gloo (FSDP2 configs emulated)")
    p.add_argument("--dtype", default="auto", choices=("float32", "bfloat16", "auto"), help="auto: bf16 on GPU")
    p.add_argument("--batch", type=int, default=16, help="prompts per step (global; a multiple of N)")
    p.add_argument("--rollouts", type=int, default=4, help="responses per prompt")
    p.add_argument("--micro", type=int, default=4, help="sequences per forward/backward on each process")
    p.add_argument("--topk", type=int, default=100)
    p.add_argument("--response-len", type=int, default=256, help="tokens per response (plus the answer)")
    p.add_argument("--image-size", type=int, default=896, help="ZoomWorld image side (896: 1,024 image tokens)")
    p.add_argument("--max-pixels", type=int, default=896 * 896)
    p.add_argument("--teacher", default="ema", choices=("ema", "frozen", "student"),
                   help="student: no fp32 teacher copy (15 GB less at 3B)")
    p.add_argument("--no-gc", dest="gc", action="store_false", help="no activation checkpointing")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    # set when this script runs itself under the launcher
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    if p.parse_known_args()[0].tiny:  # its settings are defaults: options given on the command line win
        p.set_defaults(**TINY)
    a = p.parse_args()
    a.shape = a.shape or "qwen2.5-vl-3b"
    if a.skip_baseline and a.baseline_only:
        p.error("--skip-baseline and --baseline-only exclude each other")
    a.cpu = a.cpu or not torch.cuda.is_available()
    if a.worker:
        if a.cpu and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            dc.emulate_fsdp_on_cpu()
        with dc.failure_log(a.run_dir):
            return worker(a)

    work = a.work or a.out
    model = dc.build_model(work / "model", a.shape)
    data = dc.build_data(work / "data", a.batch, a.image_size)
    args = ["--worker", "--model", str(model), "--data", str(data), "--dtype", a.dtype, "--batch", str(a.batch),
            "--rollouts", str(a.rollouts), "--micro", str(a.micro), "--topk", str(a.topk),
            "--response-len", str(a.response_len), "--max-pixels", str(a.max_pixels), "--warmup", str(a.warmup),
            "--steps", str(a.steps), "--teacher", a.teacher, "--out", str(a.out)]
    args += (["--cpu"] if a.cpu else []) + ([] if a.gc else ["--no-gc"])
    runs = {}
    one = baseline(a, args)
    if one is not None:
        runs["1"] = one
    if not a.baseline_only:
        runs[str(a.processes)] = launch_run(a, a.processes, args)
    many = runs.get(str(a.processes))
    ok = one is not None and many is not None and "error" not in one and "error" not in many
    # the same global batch, so the same tokens per step: the speed-up is the ratio of step times
    speedup = one["seconds_per_step"] / many["seconds_per_step"] if ok else None
    report = {"shape": a.shape, "dtype": a.dtype, "global_batch": [a.batch, a.rollouts], "micro_batch": a.micro,
              "response_len": a.response_len, "teacher": a.teacher, "gradient_checkpointing": a.gc,
              "accelerate_config": str(a.accelerate_config) if a.accelerate_config else "ddp",
              "runs": runs, "speedup": speedup, "efficiency": speedup / a.processes if ok else None}
    dc.write_json(a.out / "throughput.json", report)
    show(a, runs, speedup)
    if any("error" in r for r in runs.values()):
        sys.exit(1)

if __name__ == "__main__":
    main()
