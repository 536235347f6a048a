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


# ----------------------------------------------------------------------------- top-k + tail JSD


def topk_ids(student_logits: Tensor, k: int) -> Tensor:
    """The student's top-k vocabulary ids per row: [N, V] -> [N, k] (k is capped at V)."""
    return student_logits.topk(min(k, student_logits.shape[-1]), dim=-1).indices


def gather_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probs at `ids` ([N, k] or [N]) with the full-vocabulary normaliser, in fp32."""
    z = logits.float() / temperature
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
    """Generalized JSD between student and teacher distributions given as log-probs: [N, B] -> [N] fp32.

    alpha = 0 is KL(T || S), alpha = 1 is KL(S || T); in between it is
    (1 - alpha) KL(S || M) + alpha KL(T || M) with M = (1 - alpha) S + alpha T (built in log space).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    # The sum cancels to ~1e-8 of rounding noise in fp32 when S ~ T; these are only [N, k+1]
    # numbers, so float64 is cheap, and it keeps small divergences (and their sign) exact.
    log_s = log_s.double().clamp(min=_LOG_FLOOR)
    log_t = log_t.double().clamp(min=_LOG_FLOOR)
    if alpha == 0.0:
        out = _kl(log_t, log_s)
    elif alpha == 1.0:
        out = _kl(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_s + math.log(1.0 - alpha), log_t + math.log(alpha))
        out = (1.0 - alpha) * _kl(log_s, log_m) + alpha * _kl(log_t, log_m)
    return out.float()


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
    t = add_tail(teacher_topk_logprobs.detach().float())
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
        return fn(head(h).float(), *args)

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
