"""Vision-OPD training throughput on 1 GPU and on N GPUs, for the same global batch.

    # Qwen2.5-VL-3B-shaped model (random weights), 16 prompts x 4 rollouts per step, 1 vs 2 GPUs
    PYTHONPATH=src python benchmarks/distributed_throughput.py --out /tmp/tput --processes 2 \\
        --accelerate-config configs/accelerate/fsdp2.yaml
    # CPU smoke test of the script: tiny model, 2 processes over gloo
    PYTHONPATH=src python benchmarks/distributed_throughput.py --out /tmp/tput --tiny

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
(speed-up / N). Writes OUT/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_common as dc  # noqa: E402


def worker(a: argparse.Namespace) -> None:
    """Inside the launcher: time `--steps` OPD steps after `--warmup`; the main process writes JSON."""
    from zoomless.models.loading import vision_token_ids
    from zoomless.train.batching import encode_prompt
    from zoomless.train.common import Timer, start_run, view_conversation
    from zoomless.train.config import OPDConfig
    from zoomless.train.opd import opd_step, setup_teacher, view_kwargs

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
        })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--processes", type=int, default=2, help="N, compared with 1")
    p.add_argument("--accelerate-config", type=Path, default=None, help="for the N-process run, e.g. FSDP2")
    p.add_argument("--shape", choices=dc.SHAPES, default="qwen2.5-vl-3b", help="model shape (random weights)")
    p.add_argument("--tiny", action="store_true", help="CPU, shape 'test', small images and batch: a smoke test")
    p.add_argument("--cpu", action="store_true", help="run on CPU processes over gloo")
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
    a = p.parse_args()
    if a.tiny:
        a.cpu, a.shape, a.batch, a.rollouts, a.micro = True, "test", 4, 2, 2
        a.response_len, a.image_size, a.max_pixels, a.warmup, a.steps = 16, 448, 112 * 112, 1, 2
    a.cpu = a.cpu or not torch.cuda.is_available()
    if a.worker:
        return worker(a)

    model = dc.build_model(a.out / "model", a.shape)
    data = dc.build_data(a.out / "data", a.batch, a.image_size)
    args = ["--worker", "--model", str(model), "--data", str(data), "--dtype", a.dtype, "--batch", str(a.batch),
            "--rollouts", str(a.rollouts), "--micro", str(a.micro), "--topk", str(a.topk),
            "--response-len", str(a.response_len), "--max-pixels", str(a.max_pixels), "--warmup", str(a.warmup),
            "--steps", str(a.steps), "--teacher", a.teacher, "--out", str(a.out)]
    args += (["--cpu"] if a.cpu else []) + ([] if a.gc else ["--no-gc"])
    results = {}
    for n in (1, a.processes):
        run_dir = a.out / f"run-{n}"
        dc.launch(Path(__file__), n, args + ["--run-dir", str(run_dir)], cpu=a.cpu,
                  accelerate_config=a.accelerate_config if n > 1 else None)
        results[n] = json.loads((run_dir / "throughput.json").read_text())
    one, many = results[1], results[a.processes]
    speedup = many["response_tokens_per_s"] / one["response_tokens_per_s"]
    report = {"shape": a.shape, "dtype": a.dtype, "global_batch": [a.batch, a.rollouts],
              "accelerate_config": str(a.accelerate_config) if a.accelerate_config else "ddp",
              "runs": {str(k): v for k, v in results.items()}, "speedup": speedup, "efficiency": speedup / a.processes}
    dc.write_json(a.out / "throughput.json", report)
    print(f"\nVision-OPD step, shape {a.shape}, {a.batch} prompts x {a.rollouts} responses of ~{a.response_len} tokens")
    for n, r in results.items():
        print(f"  {n} process{'es' if n > 1 else '  '}: {r['seconds_per_step']:.3f} s/step  "
              f"{r['response_tokens_per_s']:.0f} response tok/s  {r['sequence_tokens_per_s']:.0f} sequence tok/s  "
              f"peak {r['peak_memory_gib']:.1f} GiB")
    print(f"  speed-up {speedup:.2f}x on {a.processes} (efficiency {speedup / a.processes:.0%})")


if __name__ == "__main__":
    main()
