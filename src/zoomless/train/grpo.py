"""GRPO with DAPO clip-higher (the ZwZ R2I recipe, spec 3), and the hybrid with Vision-OPD.

One step:
  1. the policy samples `n` responses per prompt (T 1.0) on its view (the full image or the overlay);
  2. each response is scored (`rewards.py`: rule accuracy, format, length cap, optional LLM judge);
  3. advantages are group-normalized per prompt, (r - mean) / (std + 1e-6), and broadcast to tokens;
  4. the rollout batch is split into `mini_batches`, one optimizer step each, for `updates_per_batch`
     passes; each update recomputes the importance ratio against the log-probs the policy had when
     it sampled (`ppo_clip_loss`: clip 0.2 / 0.3, optional dual clip, token mean over the mini-batch);
  5. optional k3 KL to the frozen starting model (off by default, as in the reference).
`objective: hybrid` adds the Vision-OPD term to the same rollouts, through the same forward pass:
loss = top-k JSD to the teacher on the crop + grpo_weight * GRPO loss; the EMA teacher then moves
as in `opd.py`, whose pieces (distill_tokens, the teacher, the optimizer step) are reused here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from zoomless.engines.base import Engine
from zoomless.sample import Sample
from zoomless.train.batching import PromptEncoding, encode_prompt, lm_head, response_hidden
from zoomless.train.common import (
    Rollout,
    Run,
    Timer,
    chunks,
    clip_and_step,
    hf_engine,
    response_stats,
    rollout,
    rollout_batch,
    rollout_counts,
    sampled_logprobs,
    sampling_params,
    start_run,
    train_loop,
    view_conversation,
)
from zoomless.train.config import GRPOConfig
from zoomless.train.losses import (
    chunked_logprobs,
    grpo_advantages,
    k3_kl,
    masked_token_mean,
    ppo_clip_loss,
    truncated_is_weights,
)
from zoomless.train.opd import (
    EngineFactory,
    check_views,
    distill_tokens,
    optimizer_step,
    setup_teacher,
    view_kwargs,
)
from zoomless.train.rewards import Judge, build_judge, score_responses

PPO_STATS = ("clip_high", "clip_low", "dual_clip", "ratio", "approx_kl")


def check_samples(samples: Sequence[Sample], cfg: GRPOConfig) -> None:
    """Fail before training on a sample that cannot be rewarded or shown in the asked views."""
    for s in samples:
        if s.answer is None:
            raise ValueError(f"sample {s.id}: GRPO needs a gold 'answer' to reward against, and it has none")
    if cfg.objective == "hybrid":
        check_views(list(samples), cfg)
    elif cfg.student_view == "overlay":
        bad = next((s for s in samples if s.box is None), None)
        if bad is not None:
            raise ValueError(f"sample {bad.id}: the 'overlay' view needs a 'box' and it has none")


def rollout_advantages(
    rollouts: Sequence[Rollout], rewards: Sequence[float | None], n_prompts: int, normalize_std: bool
) -> list[float | None]:
    """Each rollout's group-normalized advantage (None where the reward was skipped). Groups are the
    rollouts of one prompt that survived; dropped and skipped ones take no part in the statistics."""
    width = max((sum(r.prompt_index == i for r in rollouts) for i in range(n_prompts)), default=1)
    table = torch.zeros(n_prompts, max(width, 1))
    mask = torch.zeros(n_prompts, max(width, 1), dtype=torch.bool)
    slots, seen = [], [0] * n_prompts
    for r, rew in zip(rollouts, rewards):
        j = seen[r.prompt_index]
        seen[r.prompt_index] += 1
        slots.append((r.prompt_index, j))
        if rew is not None:
            table[r.prompt_index, j] = rew
            mask[r.prompt_index, j] = True
    adv = grpo_advantages(table, normalize_std, mask)
    return [float(adv[i, j]) if mask[i, j] else None for i, j in slots]


@dataclass
class Update:
    """The rollouts of one micro-batch and what their loss needs besides the live policy."""

    rollouts: list[Rollout]
    advantages: torch.Tensor  # [N] per token
    old_logp: torch.Tensor | None = None  # [N] log-probs when sampled (None: on-policy, ratio 1)
    ref_logp: torch.Tensor | None = None  # [N] under the frozen starting model (KL only)


def policy_loss(
    cfg: GRPOConfig,
    run: Run,
    teacher: nn.Module | None,
    student_prompts: list[PromptEncoding],
    teacher_prompts: list[PromptEncoding] | None,
    u: Update,
    denominator: float,
    timer: Timer,
) -> dict[str, float]:
    """Backprop one micro-batch's share of the step loss; return token sums of what is logged."""
    sb = rollout_batch(run, student_prompts, u.rollouts)
    sums: dict[str, float] = {}
    if cfg.objective == "hybrid":  # one student forward gives both the JSD and the sampled log-probs
        tb = rollout_batch(run, teacher_prompts, u.rollouts)
        out = distill_tokens(
            run.model, teacher, sb, tb, topk=cfg.topk, alpha=cfg.alpha, temperature=cfg.temperature,
            chunk_size=cfg.logits_chunk_size, autocast_ctx=run.autocast, timer=timer,
        )
        logp, jsd = out.logp, out.jsd
        if cfg.is_clip is not None and u.old_logp is not None:
            jsd = jsd * truncated_is_weights(logp, u.old_logp, cfg.is_clip)
        sums.update(jsd_sum=float(out.jsd.detach().sum()), agree_sum=float(out.agree.sum()))
    else:
        with timer("student"), run.autocast():
            hidden = response_hidden(run.model, sb)
            logp = chunked_logprobs(hidden, lm_head(run.model), sb.targets, cfg.temperature, cfg.logits_chunk_size)
    with timer("student"):
        old = logp.detach() if u.old_logp is None else u.old_logp
        ones = torch.ones_like(logp)
        pg, stats = ppo_clip_loss(
            logp, old, u.advantages.to(logp.device), ones, cfg.clip_low, cfg.clip_high, cfg.dual_clip, denominator
        )
        loss = pg if cfg.objective == "grpo" else jsd.sum() / denominator + cfg.grpo_weight * pg
        if u.ref_logp is not None:
            kl = k3_kl(logp, u.ref_logp)
            loss = loss + cfg.kl_coef * masked_token_mean(kl, ones, denominator)
            sums["kl_sum"] = float(kl.detach().sum())
        loss.backward()
    n = float(sb.num_tokens)
    sums["pg_sum"] = float(pg.detach()) * denominator
    sums.update({f"{k}_sum": v * n for k, v in stats.items()})
    return sums


def split_mini_batches(rollouts: list[Rollout], parts: int) -> list[list[Rollout]]:
    """`parts` contiguous, near-equal mini-batches (fewer when there are fewer rollouts)."""
    size = -(-len(rollouts) // min(parts, len(rollouts)))
    return [list(mb) for mb in chunks(rollouts, size)]


def plan_updates(
    rollouts: list[Rollout], advantages: list[float], mini_batches: int, micro_batch_size: int
) -> list[list[Update]]:
    """Mini-batches (one optimizer step each) of micro-batches (one forward/backward each), with
    every rollout's advantage broadcast over its tokens."""
    adv_of = {id(r): a for r, a in zip(rollouts, advantages)}

    def update(mb: Sequence[Rollout]) -> Update:
        lengths = torch.tensor([len(r.token_ids) for r in mb])
        return Update(list(mb), torch.tensor([adv_of[id(r)] for r in mb]).repeat_interleave(lengths))

    return [[update(mb) for mb in chunks(mini, micro_batch_size)] for mini in split_mini_batches(rollouts, mini_batches)]


def grpo_step(
    cfg: GRPOConfig,
    run: Run,
    engine: Engine,
    banned_ids: list[int],
    step: int,
    timer: Timer,
    judge: Judge | None = None,
    teacher: nn.Module | None = None,
    reference: nn.Module | None = None,
) -> dict[str, float]:
    batch = [run.samples[i] for i in run.data.next_batch()]
    view = view_kwargs(cfg)
    with timer("prompts"):
        convs = [view_conversation(s, cfg.student_view, **view) for s in batch]
    with timer("rollout"):
        rb = rollout(engine, convs, sampling_params(cfg, step), banned_ids, model=run.model, autocast_ctx=run.autocast())
    metrics: dict[str, float] = rollout_counts(rb)
    with timer("reward"):
        rewards, reward_metrics = score_responses(
            [batch[r.prompt_index] for r in rb.rollouts], [r.text for r in rb.rollouts], cfg.form,
            format_weight=cfg.format_weight, max_answer_chars=cfg.max_answer_chars, judge=judge,
        )
    metrics.update(reward_metrics)
    all_adv = rollout_advantages(rb.rollouts, [r.total for r in rewards], len(batch), cfg.normalize_std)
    rollouts = [r for r, a in zip(rb.rollouts, all_adv) if a is not None]
    advantages = [a for a in all_adv if a is not None]
    if not rollouts:  # nothing sampled or nothing rewarded: no update
        metrics.update(tokens=0.0, skipped=1.0)
        return metrics
    groups = {r.prompt_index for r in rollouts}
    signal = {r.prompt_index for r, a in zip(rollouts, advantages) if a != 0.0}
    metrics["zero_adv_groups"] = 1.0 - len(signal) / len(groups)  # groups whose rewards were all equal
    metrics["advantage_abs"] = sum(abs(a) for a in advantages) / len(advantages)

    with timer("prompts"):
        student_prompts = [encode_prompt(run.processor, c) for c in convs]
        teacher_prompts = None
        if cfg.objective == "hybrid":
            teacher_prompts = [encode_prompt(run.processor, view_conversation(s, cfg.teacher_view, **view)) for s in batch]

    plan = plan_updates(rollouts, advantages, cfg.mini_batches, cfg.micro_batch_size)
    off_policy = cfg.updates_per_batch * len(plan) > 1  # later updates need the sampling policy's log-probs
    if off_policy or reference is not None:
        with timer("old_logp"):
            for u in (u for mini in plan for u in mini):
                b = rollout_batch(run, student_prompts, u.rollouts)
                if off_policy:
                    u.old_logp = sampled_logprobs(run.model, b, cfg.temperature, cfg.logits_chunk_size, run.autocast)
                if reference is not None:
                    u.ref_logp = sampled_logprobs(reference, b, cfg.temperature, cfg.logits_chunk_size, run.autocast)

    metrics["lr"] = run.optimizer.param_groups[0]["lr"]
    passes, norms, skipped = [], [], 0
    for _ in range(cfg.updates_per_batch):
        sums: dict[str, float] = {}
        for mini in plan:
            denominator = float(sum(u.advantages.numel() for u in mini))
            for u in mini:
                for k, v in policy_loss(cfg, run, teacher, student_prompts, teacher_prompts, u, denominator, timer).items():
                    sums[k] = sums.get(k, 0.0) + v
            with timer("step"):
                norm, applied = take_step(cfg, run, teacher)
            norms.append(norm)
            skipped += not applied
        passes.append(sums)
    # the loss and divergence as sampled (first pass); clipping where it acts (last pass)
    first, last = passes[0], passes[-1]
    total = float(sum(len(r.token_ids) for r in rollouts))
    metrics["pg_loss"] = first["pg_sum"] / total
    for k in PPO_STATS:  # where clipping acts: the last pass
        metrics[k] = last[f"{k}_sum"] / total
    if "kl_sum" in first:
        metrics["kl"] = first["kl_sum"] / total
    if cfg.objective == "hybrid":
        metrics["jsd"] = first["jsd_sum"] / total
        metrics["agreement"] = first["agree_sum"] / total
    metrics.update(response_stats(rollouts))
    metrics.update(grad_norm=sum(norms) / len(norms), skipped=float(skipped))
    return metrics


def take_step(cfg: GRPOConfig, run: Run, teacher: nn.Module | None) -> tuple[float, bool]:
    """The optimizer step; in the hybrid, OPD's (which also moves the EMA teacher)."""
    if teacher is not None:
        return optimizer_step(cfg, run, teacher)
    return clip_and_step(run.model, run.optimizer, run.scheduler, cfg.grad_clip)


def load_reference(cfg: GRPOConfig, run: Run) -> nn.Module:
    """The frozen starting model for the KL term (from `model_dir`, also when resuming)."""
    from zoomless.models.loading import load_vlm

    model, _ = load_vlm(cfg.model_dir, dtype=torch.float32, device=run.device)
    model.requires_grad_(False)
    return model.eval()


def train_grpo(cfg: GRPOConfig, make_engine: EngineFactory | None = None, judge: Judge | None = None) -> Path:
    """Run GRPO (or the hybrid with Vision-OPD); return the final checkpoint directory.

    `make_engine(model, processor)` builds the rollout engine around the live policy (default: the
    in-process HF engine). `judge` overrides the one `cfg.judge` describes.
    """
    from zoomless.models.loading import vision_token_ids

    run = start_run(cfg)
    check_samples(run.samples, cfg)
    teacher, extra_models = setup_teacher(cfg, run) if cfg.objective == "hybrid" else (None, {})
    reference = load_reference(cfg, run) if cfg.kl_coef > 0 else None
    own_judge = judge is None and cfg.judge is not None
    if own_judge:
        judge = build_judge(cfg.judge)
    engine = (make_engine or (lambda m, p: hf_engine(m, p, cfg.rollout_batch_size)))(run.model, run.processor)
    run.model.train()  # engines may switch the model to eval mode; `rollout` does so only while sampling
    banned = vision_token_ids(run.processor)

    def step_fn(step: int, timer: Timer) -> dict[str, float]:
        return grpo_step(cfg, run, engine, banned, step, timer, judge, teacher, reference)

    try:
        return train_loop(cfg, run, step_fn, show=("reward", "pg_loss"), extra_models=extra_models)
    finally:
        if own_judge and hasattr(judge.engine, "close"):
            judge.engine.close()
