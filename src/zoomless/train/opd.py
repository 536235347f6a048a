"""Vision-OPD: on-policy self-distillation from the zoomed-in view to the full view (spec 1.7).

One step:
  1. the student samples `n` responses per prompt on its own view (full image, or the overlay);
  2. the student teacher-forces them (with grad) and picks its top-k ids at every response position;
  3. the teacher (EMA copy, frozen base, or the live student) teacher-forces the same responses under
     the teacher view (the crop) and keeps only its log-probs at those ids;
  4. loss = global token mean of the top-k + tail generalized JSD (alpha 0.5: JSD), backpropagated
     micro-batch by micro-batch with the step's total token count as the denominator; with
     `crop_anchor` > 0, plus that weight times the same JSD of the student on the teacher's view
     (the same responses), which keeps the zoomed-in skill while the full view learns;
  5. one AdamW step, then the EMA teacher moves 5% towards the student (in fp32).
No reward, no labels: ground-truth answers are never read.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from zoomless.engines.base import Engine
from zoomless.sample import Sample
from zoomless.train.batching import PromptEncoding, TeacherForcingBatch, lm_head, response_hidden
from zoomless.train.common import Run, sampled_logprobs, start_run, train_loop
from zoomless.train.config import OPDConfig
from zoomless.train.distributed import even_micro_batches, reshard, shard_like_policy, unwrap
from zoomless.train.ema import ema_update_, make_teacher
from zoomless.train.losses import chunked_map, gather_logprobs, topk_generalized_jsd, topk_ids, truncated_is_weights
from zoomless.train.metrics import Timer, read_values
from zoomless.train.optim import clip_and_step
from zoomless.train.rollouts import (
    EngineFactory,
    Rollout,
    is_padding,
    padding_rollout,
    response_stats,
    rollout,
    rollout_batch,
    rollout_counts,
    rollout_engine,
    sampling_params,
)
from zoomless.train.screening import screen_samples
from zoomless.train.views import step_prompts, view_conversation

def check_views(samples: list[Sample], cfg: OPDConfig) -> None:
    """Fail before training if a sample cannot be shown in the student or teacher view."""
    for s in samples:
        if s.box is not None:
            continue
        if cfg.student_view == "overlay":
            view = "overlay"
        elif cfg.teacher_view != "teacher" or s.teacher_image is None:
            view = cfg.teacher_view
        else:
            continue
        raise ValueError(f"sample {s.id}: the {view!r} view needs a 'box' (or a 'teacher_image') and it has none")


@dataclass
class TokenDistillation:
    jsd: torch.Tensor  # [N] per-token divergence, differentiable w.r.t. the student
    logp: torch.Tensor  # [N] student log-prob of each response token (for IS weights)
    agree: torch.Tensor  # [N] bool: student and teacher have the same top-1 token
    anchor_jsd: torch.Tensor | None = None  # [N] the student on the teacher's view against the teacher


def distill_tokens(
    student: nn.Module,
    teacher: nn.Module,
    student_batch: TeacherForcingBatch,
    teacher_batch: TeacherForcingBatch,
    *,
    topk: int,
    alpha: float,
    temperature: float = 1.0,
    chunk_size: int = 512,
    autocast_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    timer: Timer | None = None,
    anchor: bool = False,
) -> TokenDistillation:
    """Per-token top-k + tail JSD of one micro-batch: the student's forward (with grad) picks the
    top-k ids, the teacher's forward (no grad) keeps only its log-probs at those ids.

    `anchor`: `student_batch` holds the student-view rows followed by the same responses under the
    teacher's view (one forward, so DDP and FSDP see one); the second half's JSD against the
    teacher, at the student's own top-k ids there, comes back as `anchor_jsd`."""
    timer = timer or Timer()
    head, t_head, T = lm_head(student), lm_head(teacher), temperature
    n = teacher_batch.num_tokens
    with timer("student"), autocast_ctx():
        hs = response_hidden(student, student_batch)
        with torch.no_grad():
            ids = chunked_map(hs.detach(), head, lambda z: topk_ids(z, topk), chunk_size=chunk_size)
    with timer("teacher"), torch.no_grad(), autocast_ctx():
        ht = response_hidden(teacher, teacher_batch)
        # with the anchor, also at the ids the student picks on the teacher's view: one head pass
        wanted = torch.cat([ids[:n], ids[n:]], dim=1) if anchor else ids
        t_logp, t_top1 = chunked_map(
            ht, t_head, lambda z, i: (gather_logprobs(z, i, T), z.argmax(-1)), wanted, chunk_size=chunk_size
        )
        if anchor:  # back to one row per token of the student batch: its first half, then its second
            t_logp = torch.cat(t_logp.split(ids.shape[1], dim=1))
        del ht
    with timer("student"), autocast_ctx():
        jsd, logp = chunked_map(
            hs, head,
            lambda z, i, t, y: (topk_generalized_jsd(z, i, t, alpha, T), gather_logprobs(z, y, T)),
            ids, t_logp, student_batch.targets, chunk_size=chunk_size,
        )
    return TokenDistillation(jsd[:n], logp[:n], ids[:n, 0] == t_top1, jsd[n:] if anchor else None)


def distill_micro_batch(
    cfg: OPDConfig,
    run: Run,
    teacher: nn.Module,
    student_prompts: list[PromptEncoding],
    teacher_prompts: list[PromptEncoding],
    rollouts: list[Rollout],
    denominator: float,
    timer: Timer,
    old_logp: torch.Tensor | None = None,
) -> dict[str, float | torch.Tensor]:
    """Distill one micro-batch and backprop sum(weighted JSD) / denominator; return the sums to log.
    A padding micro-batch (`is_padding`) runs the same passes with weight 0."""
    anchor = cfg.crop_anchor > 0
    if anchor:  # the same responses again under the teacher's view, in the student's one forward
        shift = len(student_prompts)
        again = [replace(r, prompt_index=r.prompt_index + shift) for r in rollouts]
        sb = rollout_batch(run, student_prompts + teacher_prompts, rollouts + again)
    else:
        sb = rollout_batch(run, student_prompts, rollouts)
    tb = rollout_batch(run, teacher_prompts, rollouts)
    out = distill_tokens(
        run.policy, teacher, sb, tb, topk=cfg.topk, alpha=cfg.alpha, temperature=cfg.temperature,
        chunk_size=cfg.logits_chunk_size, autocast_ctx=run.autocast, timer=timer, anchor=anchor,
    )
    weights = None
    if old_logp is not None and cfg.is_clip is not None:
        weights = truncated_is_weights(out.logp, old_logp, cfg.is_clip)
    per_token = out.jsd if weights is None else out.jsd * weights
    if anchor:
        per_token = per_token + cfg.crop_anchor * out.anchor_jsd
    loss = per_token.sum() / denominator
    if is_padding(rollouts):
        loss = loss * 0.0
    with timer("student"):
        run.backward(loss)
    sums = {  # on the GPU: read once per step (`read_values`)
        "jsd_sum": out.jsd.detach().sum(),
        "anchor_jsd_sum": out.anchor_jsd.detach().sum() if anchor else 0.0,
        "agree_sum": out.agree.sum(),
        "is_weight_sum": weights.detach().sum() if weights is not None else float(tb.num_tokens),
    }
    return {k: 0.0 for k in sums} if is_padding(rollouts) else sums


def student_logprobs(cfg: OPDConfig, run: Run, prompts: list[PromptEncoding], rollouts: list[Rollout]) -> torch.Tensor:
    """Sampled-token log-probs under the current student (the "old" policy for IS weights)."""
    b = rollout_batch(run, prompts, rollouts)
    return sampled_logprobs(run.policy, b, cfg.temperature, cfg.logits_chunk_size, run.autocast)


def view_kwargs(cfg: OPDConfig) -> dict[str, Any]:
    return dict(form=cfg.form, max_pixels=cfg.max_pixels, crop_margin=cfg.crop_margin, zoom=cfg.zoom)


def setup_teacher(cfg: OPDConfig, run: Run) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The distillation teacher as `distill_tokens` runs it (restored from the checkpoint when
    resuming) and the extra models a checkpoint must hold for it (none when the live student is
    the teacher). Under FSDP an EMA or frozen teacher is sharded like the student (read from disk:
    the student's starting weights, or the checkpoint's teacher), not copied from its shards."""
    from zoomless.models.loading import load_vlm

    if cfg.teacher == "student":  # under FSDP the student runs through its sharded wrapper
        return (run.policy if run.dist.fsdp else run.model), {}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.teacher_dtype]
    if run.dist.fsdp and dtype != torch.float32:
        raise ValueError("teacher_dtype: bfloat16 is for one process: under FSDP the teacher's shards stay fp32")
    init, where = None, "cpu" if run.dist.fsdp else run.device  # fully_shard moves each shard to its GPU
    if run.resumed_from is not None:
        init, _ = load_vlm(run.resumed_from / "teacher", dtype=dtype, device=where)
    elif run.dist.fsdp:
        init, _ = load_vlm(cfg.model_dir, dtype=torch.float32, device=where)
    if run.dist.fsdp:
        teacher = shard_like_policy(run.dist, init)
    else:  # a bf16 student's copy starts from its fp32 masters
        teacher = make_teacher(run.model, cfg.teacher, init=init, weights=run.fp32_state_dict(), dtype=dtype)
    if cfg.compile_blocks:  # a deep copy's compiled parts run eagerly (nn.Module.compile is not copied)
        from zoomless.models.compiled import compile_blocks

        compile_blocks(teacher, vision_tower=cfg.compile_vision_tower)
    return teacher, {"teacher": teacher}


def optimizer_step(cfg: OPDConfig, run: Run, teacher: nn.Module) -> tuple[float, bool]:
    """Clip and apply the accumulated gradients; then the EMA teacher moves towards the student
    (under FSDP, shard by shard: both are sharded with the same plan)."""
    norm, applied = clip_and_step(run, cfg.grad_clip)
    if applied and cfg.teacher == "ema":
        if run.dist.fsdp:
            reshard(teacher)  # its forward leaves the root and the head gathered
        ema_update_(unwrap(teacher), run.fp32_parameters(), cfg.ema_rate, rounding_seed(cfg, run))
    return norm, applied


def rounding_seed(cfg: OPDConfig, run: Run) -> int:
    """The seed of a bf16 teacher's stochastic rounding (train/ema.py): from the run's seed and the
    number of updates applied so far (the scheduler's count, which a checkpoint restores), so that
    a resumed run rounds as the uninterrupted one did; scrambled, so that consecutive updates do
    not draw neighbouring streams."""
    return ((cfg.seed * 1_000_003 + run.scheduler.last_epoch) * 0x85EBCA6B) & (2**47 - 1)


def opd_step(
    cfg: OPDConfig, run: Run, teacher: nn.Module, engine: Engine, banned_ids: list[int], step: int, timer: Timer
) -> dict[str, float]:
    with timer("data"):  # the batch prepared during the last step vouches for its samples: not probed again
        run.prefetch.wait()
        indices = run.data.next_batch()
    # the views, rendered and encoded (ready when the last step prepared them in the background),
    # and the next batch's started now, before this step queues the GPU work they overlap
    with timer("prompts"):
        prompts = step_prompts(run, indices, cfg.student_view, cfg.teacher_view, view_kwargs(cfg), cfg.prefetch_prompts,
                               probes_these_views=True)  # train_opd's probe renders the two views
    with timer("rollout"):
        params = sampling_params(cfg, step, run.dist.rank)
        rb = rollout(
            engine, prompts.conversations, params, banned_ids, model=run.model, autocast_ctx=run.autocast(),
            policy=run.policy,
        )
    metrics: dict[str, float] = rollout_counts(rb, run.dist)
    total = run.dist.sum({"tokens": float(sum(len(r.token_ids) for r in rb.rollouts))})["tokens"]  # all processes
    if total == 0:  # nothing to distill: no update, the teacher stays as it is
        metrics.update(tokens=0.0, skipped=1.0)
        return metrics
    student_prompts, teacher_prompts = prompts.student, prompts.teacher
    micro = even_micro_batches(run.dist, rb.rollouts, cfg.micro_batch_size, padding_rollout(run))
    old = None
    if cfg.is_clip is not None and cfg.updates_per_batch > 1:
        with timer("student"):
            old = [student_logprobs(cfg, run, student_prompts, mb) for mb in micro]

    sums, norms, skipped = {}, [], 0
    for update in range(cfg.updates_per_batch):
        totals: dict[str, float | torch.Tensor] = dict.fromkeys(("jsd_sum", "anchor_jsd_sum", "agree_sum", "is_weight_sum"), 0.0)
        for j, mb in enumerate(micro):
            weights_from = old[j] if old is not None and update > 0 else None  # update 0 is on-policy: r = 1
            with run.dist.grad_sync(run.policy, sync=j == len(micro) - 1):
                out = distill_micro_batch(
                    cfg, run, teacher, student_prompts, teacher_prompts, mb, run.dist.denominator(total), timer,
                    weights_from,
                )
            for k in totals:
                totals[k] += out[k]
        if update == 0:
            metrics["lr"] = run.optimizer.param_groups[0]["lr"]
        with timer("step"):
            norm, applied = optimizer_step(cfg, run, teacher)
        sums.update({f"{update}/{k}": v for k, v in totals.items()})
        norms.append(norm)
        skipped += not applied
    with timer("sync"):  # the host waits here for the GPU work it queued ahead
        sums = run.dist.sum(read_values(sums))
    last = cfg.updates_per_batch - 1
    # the divergence and agreement as sampled (first update); IS weights where they act (last update)
    metrics["jsd"] = sums["0/jsd_sum"] / total
    metrics["agreement"] = sums["0/agree_sum"] / total
    if cfg.crop_anchor > 0:
        metrics["anchor_jsd"] = sums["0/anchor_jsd_sum"] / total
    if old is not None:
        metrics["is_weight"] = sums[f"{last}/is_weight_sum"] / total
    metrics.update(response_stats(rb.rollouts, run.dist))
    metrics.update(grad_norm=sum(norms) / len(norms), skipped=float(skipped))
    return metrics


def train_opd(cfg: OPDConfig, make_engine: EngineFactory | None = None) -> Path:
    """Run Vision-OPD; return the final checkpoint directory (student as a standard HF model dir,
    the teacher under `teacher/`).

    `make_engine(model, processor)` builds the rollout engine around the live student (default: the
    in-process HF engine); it must sample from the current weights at every step.
    """
    from zoomless.models.loading import vision_token_ids

    run = start_run(cfg)
    view = view_kwargs(cfg)
    screen_samples(  # bad samples stop the run or are skipped (cfg.on_bad_sample), before any work
        run, check=lambda s: check_views([s], cfg),
        probe=lambda s: [view_conversation(s, v, **view) for v in (cfg.student_view, cfg.teacher_view)],
    )
    teacher, extra_models = setup_teacher(cfg, run)
    engine = rollout_engine(cfg, run, make_engine)
    banned = vision_token_ids(run.processor)

    def step_fn(step: int, timer: Timer) -> dict[str, float]:
        return opd_step(cfg, run, teacher, engine, banned, step, timer)

    return train_loop(cfg, run, step_fn, show=("jsd", "agreement"), extra_models=extra_models)
