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
from zoomless.train.batching import PromptEncoding, lm_head, response_hidden
from zoomless.train.common import Run, sampled_logprobs, start_run, train_loop
from zoomless.train.config import GRPOConfig
from zoomless.train.data import chunks
from zoomless.train.distributed import shard_like_policy
from zoomless.train.losses import (
    chunked_logprobs,
    grpo_advantages,
    k3_kl,
    masked_token_mean,
    ppo_clip_loss,
    truncated_is_weights,
)
from zoomless.train.metrics import Timer, read_values
from zoomless.train.opd import (
    check_views,
    distill_tokens,
    optimizer_step,
    setup_teacher,
    view_kwargs,
)
from zoomless.train.optim import clip_and_step
from zoomless.train.rewards import Judge, build_judge, score_responses
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
from zoomless.train.views import step_prompts
from zoomless.transfer import to_device

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
) -> dict[str, float | torch.Tensor]:
    """Backprop one micro-batch's share of the step loss; return token sums of what is logged (the
    tensors among them are read once per step: `read_values`)."""
    sb = rollout_batch(run, student_prompts, u.rollouts)
    sums: dict[str, float | torch.Tensor] = {}
    if cfg.objective == "hybrid":  # one student forward gives both the JSD and the sampled log-probs
        tb = rollout_batch(run, teacher_prompts, u.rollouts)
        out = distill_tokens(
            run.policy, teacher, sb, tb, topk=cfg.topk, alpha=cfg.alpha, temperature=cfg.temperature,
            chunk_size=cfg.logits_chunk_size, autocast_ctx=run.autocast, timer=timer,
        )
        logp, jsd = out.logp, out.jsd
        if cfg.is_clip is not None and u.old_logp is not None:
            jsd = jsd * truncated_is_weights(logp, u.old_logp, cfg.is_clip)
        sums.update(jsd_sum=out.jsd.detach().sum(), agree_sum=out.agree.sum())
    else:
        with timer("student"), run.autocast():
            hidden = response_hidden(run.policy, sb)
            logp = chunked_logprobs(hidden, lm_head(run.policy), sb.targets, cfg.temperature, cfg.logits_chunk_size)
    with timer("student"):
        old = logp.detach() if u.old_logp is None else u.old_logp
        ones = torch.ones_like(logp)
        pg, stats = ppo_clip_loss(
            logp, old, to_device(u.advantages, logp.device), ones, cfg.clip_low, cfg.clip_high, cfg.dual_clip, denominator
        )
        loss = pg if cfg.objective == "grpo" else jsd.sum() / denominator + cfg.grpo_weight * pg
        if u.ref_logp is not None:
            kl = k3_kl(logp, u.ref_logp)
            loss = loss + cfg.kl_coef * masked_token_mean(kl, ones, denominator)
            sums["kl_sum"] = kl.detach().sum()
        if is_padding(u.rollouts):  # a placeholder pass (train/distributed.py): no gradient, nothing logged
            loss = loss * 0.0
        run.backward(loss)
    n = float(sb.num_tokens)  # the sums stay on the GPU until the step reads them (`read_values`)
    sums["pg_sum"] = pg.detach() * denominator
    sums.update({f"{k}_sum": v * n for k, v in stats.items()})
    return {k: 0.0 for k in sums} if is_padding(u.rollouts) else sums


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


def even_plan(run: Run, plan: list[list[Update]]) -> list[list[Update]]:
    """The plan padded with zero-weight micro-batches to the most mini-batches, and the most
    micro-batches in each, over processes: every process then runs the same passes and optimizer
    steps (`train/distributed.py`). Mini-batch k is the union of every process's k-th."""
    dist = run.dist
    if dist.world == 1:
        return plan
    minis = int(dist.max({"minis": float(len(plan))})["minis"])
    plan = plan + [[] for _ in range(minis - len(plan))]
    widths = dist.max({str(k): float(len(mini)) for k, mini in enumerate(plan)})
    return [
        mini + [Update([padding_rollout(run)], torch.zeros(1)) for _ in range(int(widths[str(k)]) - len(mini))]
        for k, mini in enumerate(plan)
    ]


def real_tokens(mini: Sequence[Update]) -> float:
    return float(sum(u.advantages.numel() for u in mini if not is_padding(u.rollouts)))


MEAN_OVER_SCORED = ("reward", "reward/accuracy")  # reward_metrics averages these over scored responses
MEAN_OVER_ALL = ("reward/format", "reward/capped", "reward/by_rules")  # and these over all; the rest are counts


def reward_metrics_over_processes(run: Run, metrics: dict[str, float], rewards: Sequence) -> dict[str, float]:
    """`rewards.reward_metrics` over every process's responses: means weighted by counts, counts summed."""
    if run.dist.world == 1:
        return metrics
    n, k = float(len(rewards)), float(sum(r.total is not None for r in rewards))

    def weight(key: str, scored: float, every: float) -> float:
        return scored if key in MEAN_OVER_SCORED else every if key in MEAN_OVER_ALL else 1.0

    sums = run.dist.sum({**{key: v * weight(key, k, n) for key, v in metrics.items()}, "_n": n, "_k": k})
    n, k = max(sums.pop("_n"), 1.0), max(sums.pop("_k"), 1.0)
    return {key: v / weight(key, k, n) for key, v in sums.items()}


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
    with timer("data"):  # a sample's first draw probes it (train/screening.py)
        indices = run.data.next_batch()
    batch = [run.samples[i] for i in indices]
    teacher_view = cfg.teacher_view if cfg.objective == "hybrid" else None
    # the views, rendered and encoded (ready when the last step prepared them in the background),
    # and the next batch's started now, before this step queues the GPU work they overlap
    with timer("prompts"):
        prompts = step_prompts(run, indices, cfg.student_view, teacher_view, view_kwargs(cfg), cfg.prefetch_prompts)
    with timer("rollout"):
        rb = rollout(
            engine, prompts.conversations, sampling_params(cfg, step, run.dist.rank), banned_ids, model=run.model,
            autocast_ctx=run.autocast(), policy=run.policy,
        )
    metrics: dict[str, float] = rollout_counts(rb, run.dist)
    with timer("reward"):
        rewards, reward_metrics = score_responses(
            [batch[r.prompt_index] for r in rb.rollouts], [r.text for r in rb.rollouts], cfg.form,
            format_weight=cfg.format_weight, max_answer_chars=cfg.max_answer_chars, judge=judge,
        )
    metrics.update(reward_metrics_over_processes(run, reward_metrics, rewards))
    all_adv = rollout_advantages(rb.rollouts, [r.total for r in rewards], len(batch), cfg.normalize_std)
    rollouts = [r for r, a in zip(rb.rollouts, all_adv) if a is not None]
    advantages = [a for a in all_adv if a is not None]
    groups = {r.prompt_index for r in rollouts}
    signal = {r.prompt_index for r, a in zip(rollouts, advantages) if a != 0.0}
    counts = run.dist.sum({  # over all processes (groups never span processes: a prompt's rollouts stay on one)
        "rollouts": float(len(rollouts)), "tokens": float(sum(len(r.token_ids) for r in rollouts)),
        "groups": float(len(groups)), "signal": float(len(signal)), "advantage_abs": sum(abs(a) for a in advantages),
    })
    if counts["rollouts"] == 0:  # nothing sampled or nothing rewarded: no update
        metrics.update(tokens=0.0, skipped=1.0)
        return metrics
    metrics["zero_adv_groups"] = 1.0 - counts["signal"] / counts["groups"]  # groups whose rewards were all equal
    metrics["advantage_abs"] = counts["advantage_abs"] / counts["rollouts"]

    student_prompts, teacher_prompts = prompts.student, prompts.teacher
    plan = even_plan(run, plan_updates(rollouts, advantages, cfg.mini_batches, cfg.micro_batch_size))
    off_policy = cfg.updates_per_batch * len(plan) > 1  # later updates need the sampling policy's log-probs
    if off_policy or reference is not None:
        with timer("old_logp"):
            for u in (u for mini in plan for u in mini):
                b = rollout_batch(run, student_prompts, u.rollouts)
                if off_policy:
                    u.old_logp = sampled_logprobs(run.policy, b, cfg.temperature, cfg.logits_chunk_size, run.autocast)
                if reference is not None:
                    u.ref_logp = sampled_logprobs(reference, b, cfg.temperature, cfg.logits_chunk_size, run.autocast)

    metrics["lr"] = run.optimizer.param_groups[0]["lr"]
    mini_tokens = run.dist.sum({str(k): real_tokens(mini) for k, mini in enumerate(plan)})
    passes, norms, skipped = [], [], 0
    for _ in range(cfg.updates_per_batch):
        sums: dict[str, float | torch.Tensor] = {}
        for k, mini in enumerate(plan):
            denominator = run.dist.denominator(mini_tokens[str(k)])
            for j, u in enumerate(mini):
                with run.dist.grad_sync(run.policy, sync=j == len(mini) - 1):
                    out = policy_loss(cfg, run, teacher, student_prompts, teacher_prompts, u, denominator, timer)
                for key, v in out.items():
                    sums[key] = sums.get(key, 0.0) + v
            with timer("step"):
                norm, applied = take_step(cfg, run, teacher)
            norms.append(norm)
            skipped += not applied
        passes.append(sums)
    # the loss and divergence as sampled (first pass); clipping where it acts (last pass)
    with timer("sync"):  # the host waits here for the GPU work it queued ahead
        first = run.dist.sum(read_values(passes[0]))
        last = first if len(passes) == 1 else run.dist.sum(read_values(passes[-1]))
    total = counts["tokens"]
    metrics["pg_loss"] = first["pg_sum"] / total
    for k in PPO_STATS:  # where clipping acts: the last pass
        metrics[k] = last[f"{k}_sum"] / total
    if "kl_sum" in first:
        metrics["kl"] = first["kl_sum"] / total
    if cfg.objective == "hybrid":
        metrics["jsd"] = first["jsd_sum"] / total
        metrics["agreement"] = first["agree_sum"] / total
    metrics.update(response_stats(rollouts, run.dist))
    metrics.update(grad_norm=sum(norms) / len(norms), skipped=float(skipped))
    return metrics


def take_step(cfg: GRPOConfig, run: Run, teacher: nn.Module | None) -> tuple[float, bool]:
    """The optimizer step; in the hybrid, OPD's (which also moves the EMA teacher)."""
    if teacher is not None:
        return optimizer_step(cfg, run, teacher)
    return clip_and_step(run, cfg.grad_clip)


def load_reference(cfg: GRPOConfig, run: Run) -> nn.Module:
    """The frozen starting model for the KL term (from `model_dir`, also when resuming); under
    FSDP sharded like the student."""
    from zoomless.models.loading import load_vlm

    model, _ = load_vlm(cfg.model_dir, dtype=torch.float32, device="cpu" if run.dist.fsdp else run.device)
    model.requires_grad_(False)
    return shard_like_policy(run.dist, model.eval())


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
    engine = rollout_engine(cfg, run, make_engine)
    banned = vision_token_ids(run.processor)

    def step_fn(step: int, timer: Timer) -> dict[str, float]:
        return grpo_step(cfg, run, engine, banned, step, timer, judge, teacher, reference)

    try:
        return train_loop(cfg, run, step_fn, show=("reward", "pg_loss"), extra_models=extra_models)
    finally:
        if own_judge and hasattr(judge.engine, "close"):
            judge.engine.close()
