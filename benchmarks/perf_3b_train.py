"""Training-step part of perf_3b.py: Vision-OPD and GRPO steps at a real shape, variants, profiles.

One training run (`start_run`, as `zoomless train` builds it) serves every variant, in this order:

  fp32 weights + bf16 autocast, activation checkpointing (the project's training defaults):
    hf-plain      stock transformers forward + backward on the same sequences: the labels loss over
                  full logits, HF's vision attention (a call per window or image), every sequence's
                  image encoded; no optimizer step (the reference). Every other variant encodes each
                  image once per micro-batch (zoomless.train.shared_images)
    opd           a Vision-OPD step (`opd_step`); the teacher is the live student (the same
                  forward on the crop, without the 15 GB fp32 EMA copy, so that it fits 80 GB)
    grpo          a GRPO step (`grpo_step`)
    opd-compiled  as opd with each block compiled (`zoomless.models.compiled`: decoder layers and
                  vision blocks whole; its warm-up step compiles); eager again afterwards
  bf16 compute weights with fp32 master weights in the optimizer (`bf16_weights: true`, train/master.py):
    opd-master, opd-master-compiled   as opd and opd-compiled (teacher = live student)
    grpo-master, grpo-master-compiled as grpo, with bf16 weights + fp32 masters, eager and compiled
    opd-master-compiled-parts         as opd-master with each block's attention, MLP and norms compiled
                                      separately (`compile_blocks(..., whole=False)`, as before 2026-12-07)
    opd-master-compiled-layers        as opd-master with whole decoder layers and the vision blocks in parts
                                      (`compile_blocks(..., whole_vision=False)`, as on 2026-12-07)
    opd-master-compiled-keep          as opd-master-compiled, the last `--uncheckpointed` decoder layers
                                      keep their activations (`uncheckpointed_layers`; halved on OOM)
    opd-master-compiled-vkeep, grpo-master-compiled-vkeep   as opd-master-compiled and grpo-master-compiled,
                                      the vision blocks keep their activations (`checkpoint_vision: false`)
    opd-master-compiled-tower, grpo-master-compiled-tower   as the -vkeep ones, the vision tower compiled as
                                      one region (`compile_blocks(..., vision_tower=True)`)
    opd-master-compiled-tower-keep, grpo-master-compiled-tower-keep   as the -tower ones, the last
                                      `--uncheckpointed` decoder layers not checkpointed (halved on OOM)
    opd-master-compiled-tower-rollout, opd-master-compiled-tower-rollout-static   as
                                      opd-master-compiled-tower, its rollouts sampled by the recipe's HF
                                      engine (dynamic or static KV cache; 2 timed steps)
    opd-master-compiled-ema16, opd-master-compiled-vkeep-ema16   as opd-master-compiled and its -vkeep, with
                                      the recipe's EMA teacher as a bf16 copy (`teacher_dtype: bfloat16`:
                                      7.5 GB at 3B; the fp32 copy's 15 GB do not fit 80 GB)
  bf16 weights, gradients and AdamW states (`model.to(bfloat16)`: half the memory; NOT a drop-in
  for training: without fp32 master weights a 1e-6 update is below bf16 resolution):
    grpo-bf16-nogc, opd-bf16 (fp32 EMA teacher, as the recipe keeps it), opd-bf16-nogc,
    opd-bf16-nogc-frozen-vision (vision tower not trained: no vision backward; changes the recipe),
    opd-bf16-aligned       the vision MLP zero-padded from 3,420 to 3,456 units (`align_vision_mlp`:
                           the same function and gradients; bf16 GEMMs whose sizes are not a
                           multiple of 8 run on slow kernels; Qwen3-VL-4B's 4,096 is left as is, so
                           there it is opd-bf16 again),
    opd-bf16-aligned-fused as opd-bf16-aligned with torch's fused AdamW (one kernel per step)
    opd-bf16-aligned-fused-compiled  as opd-bf16-aligned-fused with each block compiled
                           (`zoomless.models.compiled`; its warm-up step compiles)

Without checkpointing ("nogc") a micro-batch of `--nogc-micro` sequences is tried first and halved
on out-of-memory. Every step's rollouts (but the -rollout variants') come from the fixed engine (distributed_common.FixedEngine):
`--rollouts` responses of `--response-len` tokens per prompt; the data holds exactly `--prompts`
samples, so every step runs the same sequences and the FLOPs (perf_3b_measure.py) are exact. One
step of `opd`, `opd-master`, `opd-bf16-aligned-fused` and each compiled variant runs under
torch.profiler; of the eager ones another step runs under an aten op counter
(perf_3b_measure.OpCounter). `--variants` runs a subset (the model changes between them still
happen, in order).
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_common as dc  # noqa: E402
import perf_3b_measure as pm  # noqa: E402

StepFn = Callable[[Any], Any]  # step(timer) -> metrics


# ----------------------------------------------------------------------------- timing


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def free_memory(run: Any) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def suspects(cuda: bool) -> dict[str, int]:
    """Counters behind an occasional slow step (one in 6-8 took 0.3-0.4 s more on the H100,
    2026-12-07): the caching allocator freeing its cache and retrying cudaMalloc near a full GPU,
    and graphs dynamo compiled (a recompile)."""
    stats = torch.cuda.memory_stats() if cuda else {}
    return {"alloc_retries": int(stats.get("num_alloc_retries", 0)), "cuda_mallocs": int(stats.get("segment.all.allocated", 0)),
            "graphs_compiled": int(torch._dynamo.utils.counters["stats"]["unique_graphs"])}


class GcLog:
    """Python's garbage collections as they happen (gc.callbacks): generation and seconds each."""

    def __init__(self) -> None:
        self.events: list[tuple[int, float]] = []
        self._start = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.events.append((info["generation"], time.perf_counter() - self._start))

    def seconds(self) -> dict[int, float]:
        """Seconds spent collecting, by generation, since `events` was cleared."""
        out: dict[int, float] = {}
        for g, t in self.events:
            out[g] = out.get(g, 0.0) + t
        return out

    def close(self) -> None:
        gc.callbacks.remove(self._on)


def measure(step: StepFn, *, warmup: int, steps: int, cuda: bool) -> dict[str, Any]:
    """Median seconds of `steps` steps after `warmup`, the mean seconds per phase (the recipes'
    Timer: phases are host-side and approximate, the step time is synchronised) and peak memory.
    Python's garbage collector runs between the steps, as in `train_loop` (its time is counted).
    PERF_GC=per-step in the environment: as before session 18 (2026-12-07), the collector switched back on
    between steps (then a full collection could start right after a step)."""
    from zoomless.train.common import CollectBetweenSteps
    from zoomless.train.metrics import Timer

    per_step = os.environ.get("PERF_GC") == "per-step"
    collections = GcLog()
    collector, nothing = CollectBetweenSteps(), contextlib.nullcontext()
    around_loop, around_step = (nothing, collector) if per_step else (collector, nothing)
    with around_loop:

        def one(timer: Any, n: int) -> None:
            with around_step:
                step(timer)
            sync(cuda)
            collector.after_step(n)

        for i in range(warmup):
            one(Timer(), i + 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, phases, pauses, step_phases = [], {}, [], []
        for i in range(steps):
            timer = Timer()
            sync(cuda)
            before = suspects(cuda)
            collections.events.clear()
            t0 = time.perf_counter()
            one(timer, warmup + i + 1)
            seconds.append(time.perf_counter() - t0)
            pauses.append({k: v - before[k] for k, v in suspects(cuda).items()})
            step_phases.append({k: round(v, 4) for k, v in timer.seconds.items()}
                               | {f"gc{g}": round(t, 4) for g, t in collections.seconds().items()})
            for k, v in timer.seconds.items():
                phases[k] = phases.get(k, 0.0) + v / steps
    collections.close()
    return {
        "seconds_per_step": statistics.median(seconds),
        "seconds_per_step_mean": statistics.fmean(seconds),  # a rare pause moves the mean, not the median
        "step_seconds": seconds,
        "step_suspects": pauses,  # per step: what could explain a slow one (see `suspects`)
        "step_phases_s": step_phases,  # per step: where a slow one spent its time (host side; gcN: collections)
        "phases_s": phases,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gc": "per-step" if per_step else "loop",
    }


def guarded(run: Any, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`fn()`, or {"error": "out of memory"} when the GPU runs out (the run goes on)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        where = traceback.extract_tb(e.__traceback__)[-3:]  # the frames that asked for the memory
        held = torch.cuda.memory_allocated() / 2**30
        free_memory(run)
        return {"error": "out of memory", "where": [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in where],
                "allocated_gib_at_error": held}


# ----------------------------------------------------------------------------- model and optimizer switches


def set_checkpointing(model: nn.Module, on: bool, uncheckpointed_layers: int = 0, vision: bool = True) -> None:
    from zoomless.train.common import enable_activation_checkpointing

    if on:
        enable_activation_checkpointing(model, uncheckpointed_layers, checkpoint_vision=vision)
    else:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()


def inner_optimizer(run: Any) -> torch.optim.Optimizer:
    return getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper


def to_bf16_weights(run: Any) -> None:
    """Weights (in place: the optimizer keeps its parameters), gradients and AdamW states in bf16."""
    free_memory(run)
    inner_optimizer(run).state.clear()
    run.model.to(torch.bfloat16)
    free_memory(run)


def use_fused_adamw(run: Any) -> None:
    """torch's fused AdamW kernel from the next step on (its step counters live on the GPU, so the
    state starts afresh)."""
    opt = inner_optimizer(run)
    opt.state.clear()
    for group in opt.param_groups:
        group.update(fused=True, foreach=False)


def use_master_weights(run: Any, cfg: Any) -> Any:
    """Switch the run to bf16 weights with fp32 masters, as `bf16_weights: true` starts it; returns
    the fp32 optimizer to restore with `drop_master_weights`."""
    from zoomless.train.master import MasterWeights
    from zoomless.train.optim import build_optimizer

    free_memory(run)
    inner_optimizer(run).state.clear()
    old = run.optimizer
    run.master = MasterWeights(run.model)
    run.optimizer = build_optimizer(run.master.masters, cfg.lr, cfg.weight_decay, fused=True)  # as start_run
    run.dtype = torch.bfloat16  # as start_run sets it for bf16_weights (on the CPU too)
    return old


def drop_master_weights(run: Any, optimizer: Any) -> None:
    """Back to the run's own optimizer over the (now bf16) model parameters, without masters."""
    run.master.remove()
    run.master, run.optimizer = None, optimizer
    free_memory(run)


def vision_mlp_linears(mlp: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """A vision MLP's input projections and its output one: Qwen2.5-VL's gated MLP (gate, up; down)
    or Qwen3-VL's plain one (fc1; fc2)."""
    if hasattr(mlp, "up_proj"):
        return [mlp.gate_proj, mlp.up_proj], mlp.down_proj
    return [mlp.linear_fc1], mlp.linear_fc2


@torch.no_grad()
def align_vision_mlp(model: nn.Module, multiple: int = 64) -> int:
    """Zero-pad every vision MLP's intermediate size to a multiple of `multiple` (3,420 -> 3,456 at
    the 3B shape; Qwen3-VL-4B's 4,096 stays), in place. A padded unit computes act(0) = 0 (SiLU,
    GELU) and its output column is zero, so it gets zero gradients; outputs, losses and updates are
    unchanged. Returns the new size."""
    size = 0
    for block in model.model.visual.blocks:
        ins, down = vision_mlp_linears(block.mlp)
        inter = down.in_features
        size = inter + (-inter) % multiple
        for lin in ins:
            lin.weight.data = torch.cat([lin.weight, lin.weight.new_zeros(size - inter, lin.in_features)])
            if lin.bias is not None:
                lin.bias.data = torch.cat([lin.bias, lin.bias.new_zeros(size - inter)])
            lin.out_features = size
        down.weight.data = torch.cat([down.weight, down.weight.new_zeros(down.out_features, size - inter)], dim=1)
        down.in_features = size
    return size


def attention_implementations(model: nn.Module) -> dict[str, Any]:
    from zoomless.models.fast_vision import PATCHED

    return {
        "language_model": getattr(model.config.get_text_config(), "_attn_implementation", None),
        "vision": getattr(model.config.vision_config, "_attn_implementation", None),
        "vision_batched_by_window_length": any(getattr(m, PATCHED, False) for m in model.modules()),
    }


# ----------------------------------------------------------------------------- the sequences


def step_sequences(cfg: Any, run: Any, engine: Any) -> dict[str, Any]:
    """The sequences every step runs (the data holds exactly one batch of prompts): the student's
    and the teacher's, as FLOP-counting `Seq`s, the rollouts, and the student prompt encodings."""
    from zoomless.engines.base import SamplingParams
    from zoomless.train.batching import encode_prompt
    from zoomless.train.opd import view_kwargs
    from zoomless.train.rollouts import Rollout
    from zoomless.train.views import view_conversation

    view = view_kwargs(cfg)
    student = [view_conversation(s, cfg.student_view, **view) for s in run.samples]
    teacher = [view_conversation(s, cfg.teacher_view, **view) for s in run.samples]
    s_prompts = [encode_prompt(run.processor, c) for c in student]
    t_prompts = [encode_prompt(run.processor, c) for c in teacher]
    gens = engine.generate(student, SamplingParams(n=cfg.n, max_new_tokens=cfg.max_new_tokens))
    rollouts = [Rollout(i, g.token_ids, None, g.text, g.finish_reason) for i, gs in enumerate(gens) for g in gs]

    def seq(p: Any, r: Any) -> pm.Seq:
        grids = [tuple(g) for g in p.vision["image_grid_thw"].tolist()] if "image_grid_thw" in p.vision else []
        return pm.Seq(len(p.input_ids) + len(r.token_ids), len(r.token_ids), grids, r.prompt_index)

    return {
        "student": [seq(s_prompts[r.prompt_index], r) for r in rollouts],
        "teacher": [seq(t_prompts[r.prompt_index], r) for r in rollouts],
        "rollouts": rollouts,
        "prompts": s_prompts,
    }


def padding_share(seqs: list[pm.Seq], micro: int) -> float:
    """Share of the padded positions in the student's micro-batches (right padding to the longest)."""
    padded = real = 0
    for i in range(0, len(seqs), micro):
        lengths = [s.tokens for s in seqs[i : i + micro]]
        padded += len(lengths) * max(lengths)
        real += sum(lengths)
    return 1.0 - real / padded


# ----------------------------------------------------------------------------- the steps


def hf_plain_step(run: Any, seqs: dict[str, Any], micro: int) -> StepFn:
    """Stock transformers: forward with labels (full logits, HF's loss), backward, no optimizer
    step; HF's own vision attention (the zoomless batching patch is lifted while it runs)."""
    from zoomless.models.fast_vision import patch_vision_attention, unpatch_vision_attention
    from zoomless.train.common import device_batch

    batches = []
    for i in range(0, len(seqs["rollouts"]), micro):
        rollouts = seqs["rollouts"][i : i + micro]
        b = device_batch(run, [seqs["prompts"][r.prompt_index] for r in rollouts], [r.token_ids for r in rollouts],
                         distinct_pixels=False)  # HF encodes every row's image
        labels = torch.full_like(b.inputs["input_ids"], -100)
        labels[b.rows, b.positions + 1] = b.targets  # HF shifts: logits at p predict the label at p + 1
        batches.append((b.inputs, labels))

    def step(timer: Any) -> None:
        unpatch_vision_attention(run.model)
        try:
            with timer("forward+backward"):
                for inputs, labels in batches:
                    with run.autocast():
                        loss = run.model(**inputs, labels=labels, use_cache=False).loss
                    loss.backward()
                    del loss
            run.model.zero_grad(set_to_none=True)
        finally:
            patch_vision_attention(run.model)

    return step


def opd_step_fn(cfg: Any, run: Any, teacher: nn.Module, engine: Any, banned: list[int], counter: Iterator[int]) -> StepFn:
    from zoomless.train.opd import opd_step

    return lambda timer: opd_step(cfg, run, teacher, engine, banned, next(counter), timer)


def grpo_step_fn(cfg: Any, run: Any, engine: Any, banned: list[int], counter: Iterator[int]) -> StepFn:
    from zoomless.train.grpo import grpo_step

    return lambda timer: grpo_step(cfg, run, engine, banned, next(counter), timer)


def grpo_config(cfg: Any) -> Any:
    """The GRPO config of the same run (the OPD-only fields left out, as GRPOConfig demands)."""
    from zoomless.train.config import OPD_ONLY_FIELDS, GRPOConfig

    return GRPOConfig(**cfg.model_dump(exclude=set(OPD_ONLY_FIELDS)))


# ----------------------------------------------------------------------------- results


def variant_result(
    name: str, m: dict[str, Any], config: Any, seqs: dict[str, Any], *, teacher: bool, vision_trained: bool,
    checkpointing: float, micro: int, shared_images: bool, peak_flops: float | None, what: str,
    checkpoint_vision: bool = True,
) -> dict[str, Any]:
    out = {"variant": name, "what": what, "gradient_checkpointing": checkpointing, "micro_batch": micro,
           "shared_images": shared_images, **m}
    if "error" in m:
        return out
    flops = pm.step_flops(config, seqs["student"], seqs["teacher"] if teacher else (), vision_trained=vision_trained,
                          checkpointing=checkpointing, shared_images=shared_images, micro=micro,
                          checkpoint_vision=checkpoint_vision)
    s = m["seconds_per_step"]
    response = sum(q.head_tokens for q in seqs["student"])
    sequence = sum(q.tokens for q in seqs["student"])
    out.update(
        response_tokens_per_s=response / s, sequence_tokens_per_s=sequence / s,
        model_tflop_per_step=flops["model"] / 1e12, recompute_tflop_per_step=flops["recompute"] / 1e12,
        achieved_tflop_s=flops["model"] / s / 1e12,
        mfu=flops["model"] / s / peak_flops if peak_flops else None,
        hfu=(flops["model"] + flops["recompute"]) / s / peak_flops if peak_flops else None,
        tflop_by_part={k: v / 1e12 for k, v in flops["parts"].items()},
    )
    return out


def flop_check(run: Any, seqs: dict[str, Any]) -> dict[str, Any]:
    """The analytic forward FLOPs of one student sequence (backbone, no head) against torch's
    FlopCounterMode on the real forward: matmuls and convolutions apart from attention kernels. The
    counter counts attention as if it were not causal (so the analytic side does too here), has no
    formula for grouped-query SDPA (the key/value heads are repeated while it counts) nor for the
    CPU's attention kernel."""
    from unittest import mock

    from torch.utils.flop_counter import FlopCounterMode

    from zoomless.train.batching import backbone_hidden
    from zoomless.train.rollouts import rollout_batch

    b = rollout_batch(run, seqs["prompts"], seqs["rollouts"][:1])
    counter = FlopCounterMode(display=False)
    no_gqa = mock.patch("transformers.integrations.sdpa_attention.use_gqa_in_sdpa", lambda *args, **kw: False)
    with torch.no_grad(), run.autocast(), no_gqa, counter:
        backbone_hidden(run.model, b.inputs, b.rows, b.positions)
    by_op = {str(k): float(v) for k, v in counter.get_flop_counts()["Global"].items()}
    attention = sum(v for k, v in by_op.items() if "attention" in k)
    s = seqs["student"][0]
    f = pm.forward_flops(run.model.config, pm.Seq(s.tokens, 0, s.grids), causal=False)
    linear = f["lm_linear"] + f["vision_linear"]
    return {
        "counted_tflop_by_op": {k: v / 1e12 for k, v in by_op.items()},
        "analytic_over_counted_matmuls": linear / (sum(by_op.values()) - attention),
        "analytic_over_counted_attention": (f["lm_attention"] + f["vision_attention"]) / attention if attention else None,
    }


# ----------------------------------------------------------------------------- the part


def run_train_part(a: Any, model_dir: Path, data: Path, out: Path, peak_flops: float | None, save: Callable) -> None:
    """Every variant in turn; `save(results)` after each one, so a stopped run keeps what it measured."""
    from zoomless.models.compiled import compile_blocks, uncompile_blocks
    from zoomless.models.loading import vision_token_ids
    from zoomless.train.common import start_run
    from zoomless.train.config import OPDConfig
    from zoomless.train.ema import make_teacher

    cfg = OPDConfig(
        model_dir=model_dir, data=data, out_dir=a.work / "train-run", batch_size=a.prompts, n=a.rollouts,
        micro_batch_size=a.micro, max_new_tokens=a.response_len, max_pixels=a.max_pixels, gradient_checkpointing=True,
        teacher="student", dtype=a.dtype, device="auto" if torch.cuda.is_available() else "cpu", lr=1e-6,
        warmup_steps=0, max_steps=10**6, tensorboard=False, progress=False,
    )
    run = start_run(cfg)
    cuda = run.device.type == "cuda"
    engine = dc.FixedEngine(run.processor, a.response_len)
    banned = vision_token_ids(run.processor)
    seqs = step_sequences(cfg, run, engine)
    counter = iter(range(1, 10**9))
    per_sequence = pm.step_flops(run.model.config, seqs["student"], seqs["teacher"])
    opd_flops = pm.step_flops(run.model.config, seqs["student"], seqs["teacher"], shared_images=True)
    vision = opd_flops["parts"]["vision_linear"] + opd_flops["parts"]["vision_attention"]
    results: dict[str, Any] = {
        "setup": {
            "prompts": a.prompts, "rollouts": a.rollouts, "response_tokens": seqs["student"][0].head_tokens,
            "student_sequence_tokens": statistics.mean(q.tokens for q in seqs["student"]),
            "teacher_sequence_tokens": statistics.mean(q.tokens for q in seqs["teacher"]),
            "image_grid_thw": seqs["student"][0].grids, "micro_batch": a.micro,
            "student_padding_share": padding_share(seqs["student"], a.micro),
            "attention": attention_implementations(run.model), "autocast": str(run.dtype),
        },
        "variants": [],
        "profiles": {},
        "opd_vision_share_of_model_flops": vision / opd_flops["model"],
        # the rollouts of one prompt share its image: encoded once per prompt, not once per sequence
        "opd_flops_saved_by_one_vision_pass_per_prompt": 1 - opd_flops["model"] / per_sequence["model"],
    }
    try:  # before any variant changes the model
        results["flop_check"] = flop_check(run, seqs)
    except Exception as e:  # noqa: BLE001 - a check that cannot run must not cost the measurements
        results["flop_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    timing = dict(warmup=a.warmup, steps=a.steps, cuda=cuda)

    def wanted(name: str) -> bool:
        return not a.variants or name in a.variants

    def add(name: str, step: StepFn, what: str, *, teacher: bool, gc_on: float, micro: int, vision: bool = True,
            shared: bool = True, gc_vision: bool = True, steps: int | None = None) -> None:
        """`gc_on`: the share of decoder layers checkpointed (True: all). `shared`: the step encodes
        each distinct image once per micro-batch (every zoomless step). `steps`: timed steps, if not --steps."""
        if not wanted(name):
            return
        print(f"[train] {name} ...", flush=True)
        free_memory(run)  # what the last variant left in reference cycles (the collector is off while measuring)
        m = guarded(run, lambda: measure(step, **(timing | ({"steps": steps} if steps else {}))))
        r = variant_result(name, m, run.model.config, seqs, teacher=teacher, vision_trained=vision, checkpointing=gc_on,
                           micro=micro, shared_images=shared, peak_flops=peak_flops, what=what,
                           checkpoint_vision=gc_vision)
        mfu = "" if r.get("mfu") is None else f", MFU {r['mfu']:.1%}"
        peak = "" if r.get("peak_memory_gib") is None else f", peak {r['peak_memory_gib']:.1f} GiB"
        print(f"[train] {name}: " + (f"{r['error']} at {r.get('where')}, {r.get('allocated_gib_at_error', 0):.1f} GiB allocated" if "error" in r else
              f"{r['seconds_per_step']:.3f} s/step, {r['sequence_tokens_per_s']:.0f} seq tok/s{mfu}{peak}"), flush=True)
        results["variants"].append(r)
        save(results)

    def nogc(name: str, make: Callable[[int], StepFn], what: str, **kw: Any) -> None:
        """A variant without checkpointing: micro-batch `--nogc-micro`, halved on out-of-memory."""
        micro = a.nogc_micro
        while wanted(name):
            add(name, make(micro), what, gc_on=False, micro=micro, **kw)
            if "error" not in results["variants"][-1] or micro == 1:
                return
            results["variants"].pop()
            micro //= 2

    def profile(name: str, step: StepFn, count: bool = True) -> None:
        """One step under torch.profiler; `count`: another under pm.OpCounter (which does not see
        into compiled code: dynamo runs the frames eagerly under a dispatch mode)."""
        if not (a.profile and wanted(name)):
            return
        print(f"[train] profiling one {name} step ...", flush=True)
        ranges = {"vision_tower": run.model.model.visual, "language_model": run.model.model.language_model}
        p = guarded(run, lambda: pm.profile_call(lambda: step(Timer()), ranges))
        if "error" not in p and count:
            p["op_count"] = guarded(run, lambda: pm.count_ops(lambda: step(Timer())))
        results["profiles"][name] = p
        if "error" not in p:
            text = pm.profile_text(f"one {name} step", p)
            print(text, flush=True)
            (out / f"profile_{name}.txt").write_text(text + "\n")
        save(results)

    from zoomless.train.metrics import Timer

    def compiled_variants(*variants: tuple[str, StepFn, str], whole: bool = True, whole_vision: bool = True,
                          gc_on: float = 1.0, gc_vision: bool = True, vision_tower: bool = False,
                          steps: int | None = None) -> None:
        """(name, step, like) each with the blocks compiled (`compile_blocks(..., whole, whole_vision)`; the first
        warm-up step compiles, the others reuse the graphs); the model is eager again after."""
        variants = tuple(v for v in variants if wanted(v[0]))
        if not variants:
            return
        compiled = compile_blocks(run.model, whole, whole_vision, vision_tower)
        for name, step, like in variants:
            add(name, step, f"{like}, {len(compiled)} blocks or block parts compiled (zoomless.models.compiled)",
                teacher=name.startswith("opd"), gc_on=gc_on, micro=a.micro, gc_vision=gc_vision, steps=steps)
            profile(name, step, count=False)
        uncompile_blocks(compiled)
        torch._dynamo.reset()  # the next compiled variant starts from an empty cache

    # fp32 weights + bf16 autocast, checkpointing on: the project's defaults
    add("hf-plain", hf_plain_step(run, seqs, a.micro), "stock transformers fwd+bwd (labels loss), no optimizer step",
        teacher=False, gc_on=True, micro=a.micro, shared=False)  # HF encodes every sequence's image
    opd = opd_step_fn(cfg, run, run.model, engine, banned, counter)
    add("opd", opd, "Vision-OPD step, fp32 weights, teacher = live student", teacher=True, gc_on=True, micro=a.micro)
    grpo = grpo_step_fn(grpo_config(cfg), run, engine, banned, counter)
    # the prompts prepared on the main thread at the start of each step, as before train/prefetch.py:
    # what the prefetch thread saves, or costs (it shares the GIL with the thread launching kernels)
    sync_cfg = cfg.model_copy(update={"prefetch_prompts": False})
    opd_sync = opd_step_fn(sync_cfg, run, run.model, engine, banned, counter)
    grpo_sync = grpo_step_fn(grpo_config(sync_cfg), run, engine, banned, counter)
    add("grpo", grpo, "GRPO step, fp32 weights", teacher=False, gc_on=True, micro=a.micro)
    profile("opd", opd)
    compiled_variants(("opd-compiled", opd, "as opd"))  # the recipe's fp32 weights

    # bf16 compute weights, fp32 master weights in the optimizer (`bf16_weights: true`)
    if not a.variants or any("-master" in v for v in a.variants):
        fp32_optimizer = use_master_weights(run, cfg)
        add("opd-master", opd, "Vision-OPD step, bf16 weights + fp32 masters (bf16_weights), teacher = live student",
            teacher=True, gc_on=True, micro=a.micro)
        profile("opd-master", opd)
        add("grpo-master", grpo, "GRPO step, bf16 weights + fp32 masters (bf16_weights)", teacher=False, gc_on=True,
            micro=a.micro)
        compiled_variants(("opd-master-compiled-parts", opd, "as opd-master, block parts"), whole=False)
        compiled_variants(("opd-master-compiled-layers", opd, "as opd-master, whole decoder layers, vision block parts"),
                          whole_vision=False)
        compiled_variants(("opd-master-compiled", opd, "as opd-master"),
                          ("grpo-master-compiled", grpo, "as grpo-master"),
                          ("opd-master-compiled-sync", opd_sync, "as opd-master, prefetch_prompts: false"),
                          ("grpo-master-compiled-sync", grpo_sync, "as grpo-master, prefetch_prompts: false"))
        layers = len(run.model.get_decoder().layers)

        def kept_layers(name: str, step: StepFn, like: str, vision: bool = True, tower: bool = False) -> None:
            """`name`: the last `--uncheckpointed` decoder layers keep their activations
            (`uncheckpointed_layers`), halved on out-of-memory as nogc's micro-batch."""
            keep = a.uncheckpointed
            while keep and wanted(name):
                set_checkpointing(run.model, True, keep, vision=vision)
                compiled_variants((name, step, f"{like}, the last {keep} decoder layers not checkpointed "
                                               f"(uncheckpointed_layers: {keep})"),
                                  gc_on=1 - min(keep / layers, 1.0), gc_vision=vision, vision_tower=tower)
                set_checkpointing(run.model, True)
                if "error" not in results["variants"][-1]:
                    return
                results["variants"].pop()
                keep //= 2

        kept_layers("opd-master-compiled-keep", opd, "as opd-master-compiled")
        # the vision blocks not checkpointed (checkpoint_vision: false), then the same with the tower in one region
        for suffix, tower, like in (("vkeep", False, "vision blocks not checkpointed (checkpoint_vision: false)"),
                                    ("tower", True, "vision blocks not checkpointed, the vision tower compiled as one "
                                                    "region (compile_blocks(..., vision_tower=True))")):
            names = [f"{recipe}-master-compiled-{suffix}" for recipe in ("opd", "grpo")]
            if not any(wanted(n) for n in names):
                continue
            set_checkpointing(run.model, True, vision=False)
            compiled_variants((names[0], opd, f"as opd-master-compiled, {like}"),
                              (names[1], grpo, f"as grpo-master-compiled, {like}"), gc_vision=False, vision_tower=tower)
            set_checkpointing(run.model, True)
        # the recipe's own rollouts (the HF engine sampling from the live policy, `rollout_cache` dynamic or
        # static) instead of the fixed engine's: a step end to end, the "rollout" phase apart; a random model
        # rarely says eos, so each rollout runs to --response-len tokens; 2 timed steps (each takes seconds)
        real = {f"opd-master-compiled-tower-{s}": c for s, c in (("rollout", "dynamic"), ("rollout-static", "static"))}
        if any(wanted(n) for n in real):
            from zoomless.train.rollouts import hf_engine

            set_checkpointing(run.model, True, vision=False)
            compiled_variants(*[(n, opd_step_fn(cfg, run, run.model, hf_engine(run.model, run.processor, cfg.rollout_batch_size, c),
                                                banned, counter),
                                 f"as opd-master-compiled-tower, rollouts sampled by the HF engine ({c} KV cache)")
                                for n, c in real.items()], gc_vision=False, vision_tower=True, steps=2)
            set_checkpointing(run.model, True)
        for recipe, step in (("opd", opd), ("grpo", grpo)):  # the tower in one region and fewer recomputed layers
            kept_layers(f"{recipe}-master-compiled-tower-keep", step, f"as {recipe}-master-compiled-tower",
                        vision=False, tower=True)
        # the recipe's EMA teacher, its copy in bf16 (teacher_dtype: bfloat16; the fp32 one does not fit 80 GB
        # at 3B): its forward on its own weights and its stochastically rounded update after each step
        ema16 = [n for n in ("opd-master-compiled-ema16", "opd-master-compiled-vkeep-ema16") if wanted(n)]
        if ema16:
            teacher16 = make_teacher(run.model, "ema", weights=run.fp32_state_dict(), dtype=torch.bfloat16)
            compile_blocks(teacher16)
            ema16_cfg = cfg.model_copy(update={"teacher": "ema", "teacher_dtype": "bfloat16"})
            opd16 = opd_step_fn(ema16_cfg, run, teacher16, engine, banned, counter)
            for name in ema16:
                keep_vision = "-vkeep" in name
                set_checkpointing(run.model, True, vision=not keep_vision)
                compiled_variants((name, opd16, "as opd-master-compiled" + (", vision blocks not checkpointed" if
                                   keep_vision else "") + ", the EMA teacher as a bf16 copy (teacher_dtype: bfloat16)"),
                                  gc_vision=not keep_vision)
                set_checkpointing(run.model, True)
            del teacher16, opd16
            free_memory(run)
        drop_master_weights(run, fp32_optimizer)

    # bf16 weights, gradients and optimizer states
    to_bf16_weights(run)
    set_checkpointing(run.model, False)
    nogc("grpo-bf16-nogc", lambda m: grpo_step_fn(grpo_config(cfg.model_copy(update={"micro_batch_size": m})), run,
                                                  engine, banned, counter), "GRPO step, bf16 weights", teacher=False)
    ema_cfg = cfg.model_copy(update={"teacher": "ema"})
    teacher = make_teacher(run.model, "ema")  # fp32, as the recipe keeps it

    def opd_bf16(m: int) -> StepFn:
        return opd_step_fn(ema_cfg.model_copy(update={"micro_batch_size": m}), run, teacher, engine, banned, counter)

    set_checkpointing(run.model, True)
    add("opd-bf16", opd_bf16(a.micro), "Vision-OPD step, bf16 weights, fp32 EMA teacher", teacher=True, gc_on=True,
        micro=a.micro)
    set_checkpointing(run.model, False)
    nogc("opd-bf16-nogc", opd_bf16, "Vision-OPD step, bf16 weights, fp32 EMA teacher", teacher=True)
    run.model.model.visual.requires_grad_(False)
    nogc("opd-bf16-nogc-frozen-vision", opd_bf16, "as opd-bf16-nogc, vision tower frozen (changes what is trained)",
         teacher=True, vision=False)
    run.model.model.visual.requires_grad_(True)
    set_checkpointing(run.model, True)
    size = align_vision_mlp(run.model)
    align_vision_mlp(teacher)
    inner_optimizer(run).state.clear()  # the padded parameters changed shape
    add("opd-bf16-aligned", opd_bf16(a.micro), f"as opd-bf16, vision MLP zero-padded to {size} units (exact)",
        teacher=True, gc_on=True, micro=a.micro)
    use_fused_adamw(run)
    add("opd-bf16-aligned-fused", opd_bf16(a.micro), "as opd-bf16-aligned, fused AdamW", teacher=True, gc_on=True,
        micro=a.micro)
    profile("opd-bf16-aligned-fused", opd_bf16(a.micro))

    # the block parts compiled (fused norms, SwiGLU, rotary, casts); the first (warm-up) step compiles
    if wanted("opd-bf16-aligned-fused-compiled"):
        n = len(compile_blocks(run.model))
        compile_blocks(teacher)
        add("opd-bf16-aligned-fused-compiled", opd_bf16(a.micro),
            f"as opd-bf16-aligned-fused, {n} blocks or block parts compiled (zoomless.models.compiled)", teacher=True,
            gc_on=True, micro=a.micro)
        profile("opd-bf16-aligned-fused-compiled", opd_bf16(a.micro), count=False)
