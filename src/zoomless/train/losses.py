"""Training losses as pure functions, computed in fp32 (the final divergence over k+1 buckets in fp64).

Vision-OPD's distillation loss (spec 1.1-1.2): at every response position the *student* picks its
top-k vocabulary ids; both models' log-probs at those ids (each normalised over its full vocabulary)
plus one tail bucket holding the leftover mass form two (k+1)-way distributions, and the loss is a
generalized Jensen-Shannon divergence between them. The teacher side only ever needs [N, k] numbers,
so a teacher pass keeps exactly that.

The language-model head is applied only to response positions and in chunks (`chunked_map`), so no
[tokens x vocab] fp32 tensor exists for all tokens at once, not even for the backward pass.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# A log-prob this low is probability 0 in fp32; flooring -inf here keeps 0 * log 0 terms finite.
_LOG_FLOOR = -1e4


def at_least_fp32(x: Tensor) -> Tensor:
    """fp32 for bf16/fp16/fp32 input; float64 stays float64, so the losses can be gradchecked."""
    return x if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------- top-k + tail JSD


def topk_ids(student_logits: Tensor, k: int) -> Tensor:
    """The student's top-k vocabulary ids per row: [N, V] -> [N, k] (k is capped at V)."""
    return student_logits.topk(min(k, student_logits.shape[-1]), dim=-1).indices


def gather_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probs at `ids` ([N, k] or [N]) with the full-vocabulary normaliser, in fp32 (or float64)."""
    z = at_least_fp32(logits) / temperature
    squeeze = ids.dim() == z.dim() - 1
    idx = ids.unsqueeze(-1) if squeeze else ids
    out = z.gather(-1, idx) - z.logsumexp(-1, keepdim=True)
    return out.squeeze(-1) if squeeze else out


def add_tail(topk_logprobs: Tensor) -> Tensor:
    """Append log(1 - sum p) as a (k+1)-th bucket: [N, k] -> [N, k+1], a proper distribution.

    log_s is clamped to <= -1e-7 so the tail stays finite when the top-k already hold all the mass.
    """
    log_s = topk_logprobs.logsumexp(-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([topk_logprobs, torch.log(-torch.expm1(log_s))], dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) summed over the last dim, from log-probs."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(log_s: Tensor, log_t: Tensor, alpha: float) -> Tensor:
    """Generalized JSD between student and teacher distributions given as log-probs: [N, B] -> [N] fp32
    (float64 when an input is float64).

    alpha = 0 is KL(T || S), alpha = 1 is KL(S || T); in between it is
    (1 - alpha) KL(S || M) + alpha KL(T || M) with M = (1 - alpha) S + alpha T (built in log space).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    # The sum cancels to ~1e-8 of rounding noise in fp32 when S ~ T; these are only [N, k+1]
    # numbers, so float64 is cheap, and it keeps small divergences (and their sign) exact.
    wide = torch.float64 in (log_s.dtype, log_t.dtype)  # float64 in, float64 out
    log_s = log_s.double().clamp(min=_LOG_FLOOR)
    log_t = log_t.double().clamp(min=_LOG_FLOOR)
    if alpha == 0.0:
        out = _kl(log_t, log_s)
    elif alpha == 1.0:
        out = _kl(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_s + math.log(1.0 - alpha), log_t + math.log(alpha))
        out = (1.0 - alpha) * _kl(log_s, log_m) + alpha * _kl(log_t, log_m)
    return out if wide else out.float()


def topk_generalized_jsd(
    student_logits: Tensor,
    ids: Tensor,
    teacher_topk_logprobs: Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token top-k + tail generalized JSD: [N, V], [N, k], [N, k] -> [N].

    `ids` are the student's top-k ids (`topk_ids`); `teacher_topk_logprobs` are the teacher's
    log-probs at those ids with its full-vocab normaliser (`gather_logprobs`). The teacher side is
    detached: gradients flow only through the student.
    """
    s = add_tail(gather_logprobs(student_logits, ids, temperature))
    t = add_tail(at_least_fp32(teacher_topk_logprobs.detach()))
    return generalized_jsd(s, t, alpha)


# ----------------------------------------------------------------------------- other token losses


def token_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross-entropy in fp32: [N, V], [N] -> [N]."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def masked_token_mean(values: Tensor, mask: Tensor, denominator: float | Tensor | None = None) -> Tensor:
    """sum(values * mask) / denominator (default: the number of valid tokens in `mask`).

    Pass the step's global token count as `denominator` to backpropagate micro-batches one at a
    time and still get the exact global token mean.
    """
    mask = mask.to(values.dtype)
    denom = mask.sum().clamp(min=1.0) if denominator is None else denominator
    return (values * mask).sum() / denom


def truncated_is_weights(logp_new: Tensor, logp_old: Tensor, clip: float) -> Tensor:
    """Token-level truncated importance weights min(exp(logp_new - logp_old), clip), detached."""
    return (logp_new.detach() - logp_old.detach()).clamp(-20.0, 20.0).exp().clamp(max=clip)


# ----------------------------------------------------------------------------- GRPO


def grpo_advantages(
    rewards: Tensor, normalize_std: bool = True, mask: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages: [G groups, n rollouts] -> [G, n] fp32.

    A = (r - group mean) / (group std + eps), the std unbiased (as the GRPO reference), or only
    r - mean with `normalize_std=False`. `mask` [G, n] (bool) marks the rollouts that exist: the
    others (dropped, or skipped by the reward) take no part in their group's statistics and get
    advantage 0. A group whose rewards are all equal, or that has one member, gets 0 everywhere.
    """
    r = rewards.float()
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.bool()
    w = m.float()
    count = w.sum(-1, keepdim=True)
    mean = (r * w).sum(-1, keepdim=True) / count.clamp(min=1.0)
    centred = (r - mean) * w
    if normalize_std:
        var = (centred**2).sum(-1, keepdim=True) / (count - 1.0).clamp(min=1.0)
        centred = centred / (var.sqrt() + eps)
    return centred * w


def ppo_clip_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped policy loss with clip-higher and optional dual clip, token-mean aggregated.

    Per token, with r = exp(logp_new - logp_old):
        loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    and with `dual_clip` = c > 1, for A < 0 the loss is further capped at -A c, so one token whose
    ratio exploded cannot dominate the step. All tensors have one shape ([N] flat tokens or
    [B, L] padded); `mask` marks valid tokens. The loss is sum(loss * mask) / denominator (default:
    the number of valid tokens; pass the step's token count to backprop micro-batches separately).

    Returned stats (0-dim tensors) are means over the valid tokens of this call: `clip_high` (A > 0 and r above
    1 + clip_high: no gradient), `clip_low` (A < 0 and r below 1 - clip_low: no gradient), `dual_clip`
    (A < 0 and the cap active), `ratio`, and `approx_kl` (mean of logp_old - logp_new).
    """
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low} and {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    adv = advantages.detach().float()
    log_ratio = (logp_new.float() - logp_old.detach().float()).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual = (adv < 0) & (cap < loss)
        loss = torch.where(dual, cap, loss)
    total = masked_token_mean(loss, mask, denominator)

    with torch.no_grad():  # 0-dim tensors: read by the caller when it logs (each read waits for the GPU)
        valid = mask.bool()
        n = valid.sum().clamp(min=1)

        def frac(flags: Tensor) -> Tensor:
            return (flags & valid).sum() / n

        stats = {
            "clip_high": frac((adv > 0) & (ratio > 1.0 + clip_high)),
            "clip_low": frac((adv < 0) & (ratio < 1.0 - clip_low)),
            "dual_clip": frac(dual),
            "ratio": (ratio * valid).sum() / n,
            "approx_kl": (-log_ratio * valid).sum() / n,
        }
    return total, stats


def k3_kl(logp: Tensor, logp_ref: Tensor, max_value: float = 10.0) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference) from the sampled tokens' log-probs:
    exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased, low variance; capped at `max_value`."""
    d = (logp_ref.detach().float() - logp.float()).clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(max=max_value)


# ----------------------------------------------------------------------------- chunked LM head


def chunked_map(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    fn: Callable[..., Tensor | tuple[Tensor, ...]],
    *row_args: Tensor,
    chunk_size: int = 512,
) -> Tensor | tuple[Tensor, ...]:
    """Apply `fn(head(h).float(), *args)` over chunks of rows of `hidden` [N, H]; concatenate outputs.

    Every `row_args` tensor is split along dim 0 like `hidden`. When `hidden` requires grad each
    chunk is recomputed in the backward pass (activation checkpointing), so only one chunk of
    [chunk_size x vocab] logits is alive at any time, forward or backward.
    """

    def run(h: Tensor, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        return fn(at_least_fp32(head(h)), *args)

    outs = []
    for i in range(0, hidden.shape[0], chunk_size):
        h = hidden[i : i + chunk_size]
        args = [a[i : i + chunk_size] for a in row_args]
        if h.requires_grad and torch.is_grad_enabled():
            outs.append(checkpoint(run, h, *args, use_reentrant=False))
        else:
            outs.append(run(h, *args))
    if not outs:  # no rows: call once on an empty chunk to get correctly shaped empty outputs
        return run(hidden[:0], *[a[:0] for a in row_args])
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def chunked_logprobs(
    hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, temperature: float = 1.0, chunk_size: int = 512
) -> Tensor:
    """Log-prob of each target token from response hidden states: [N, H], [N] -> [N] fp32."""
    return chunked_map(hidden, head, lambda z, y: gather_logprobs(z, y, temperature), targets, chunk_size=chunk_size)


def chunked_response_logits(hidden: Tensor, head: Callable[[Tensor], Tensor], chunk_size: int = 512) -> Tensor:
    """Full fp32 logits for response rows, chunk by chunk (only for small N: the result is [N, V])."""
    return chunked_map(hidden, head, lambda z: z, chunk_size=chunk_size)
