"""Rollouts: sampling responses with the live policy, dropping the unusable ones, and what the
recipes log about them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from zoomless.engines.base import Conversation, Engine, Generation, SamplingParams
from zoomless.train.batching import PromptEncoding, TeacherForcingBatch
from zoomless.train.common import device_batch, end_of_turn_id
from zoomless.train.distributed import Dist, gathered_for_generation

if TYPE_CHECKING:
    from zoomless.train.common import Run


@dataclass
class Rollout:
    prompt_index: int  # which conversation it answers
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str


PADDING = "padding"  # finish_reason of a placeholder rollout: a zero-weight micro-batch (train/distributed.py)


def padding_rollout(run: "Run") -> Rollout:
    """A one-token placeholder under the first prompt, for a process with fewer micro-batches than
    the others: it runs the same passes and contributes nothing (its loss is multiplied by 0)."""
    return Rollout(0, [end_of_turn_id(run.model, run.processor)], None, "", PADDING)


def is_padding(rollouts: Sequence[Rollout]) -> bool:
    return len(rollouts) == 1 and rollouts[0].finish_reason == PADDING


@dataclass
class RolloutBatch:
    rollouts: list[Rollout] = field(default_factory=list)
    dropped_vision: int = 0  # responses holding vision special tokens (cannot be teacher-forced)
    dropped_other: int = 0  # engine errors and empty responses
    total: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_vision + self.dropped_other


def filter_generations(generations: Sequence[Sequence[Generation]], banned_ids: Sequence[int]) -> RolloutBatch:
    """Keep the usable generations; drop (and count) ones with vision special tokens, errors or no tokens."""
    banned = set(banned_ids)
    out = RolloutBatch()
    for i, gens in enumerate(generations):
        for g in gens:
            out.total += 1
            if g.error is not None or not g.token_ids:
                out.dropped_other += 1
            elif banned.intersection(g.token_ids):
                out.dropped_vision += 1
            else:
                out.rollouts.append(Rollout(i, list(g.token_ids), g.logprobs, g.text, g.finish_reason))
    return out


def rollout(
    engine: Engine,
    conversations: Sequence[Conversation],
    params: SamplingParams,
    banned_ids: Sequence[int],
    model: nn.Module | None = None,
    autocast_ctx: contextlib.AbstractContextManager | None = None,
    policy: nn.Module | None = None,
) -> RolloutBatch:
    """Sample `params.n` responses per conversation with the policy; drop unusable ones.

    `model` (the policy inside the engine) is put in eval mode for sampling and back in train mode
    after; `policy` (its training wrapper) has its parameters gathered meanwhile when FSDP shards them.
    """
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        gathered = gathered_for_generation(policy) if policy is not None else contextlib.nullcontext()
        with torch.no_grad(), gathered, (autocast_ctx or contextlib.nullcontext()):
            generations = engine.generate(list(conversations), params)
    finally:
        if model is not None and was_training:
            model.train()
    return filter_generations(generations, banned_ids)


def sampling_params(cfg: Any, step: int, rank: int = 0) -> SamplingParams:
    """The rollout sampling of one step (`cfg` has n, temperature, top_p, max_new_tokens, seed).
    The seed is a pure function of the step (and of the process, which samples its own prompts),
    so a resumed run samples what the straight run did."""
    return SamplingParams(
        n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed * 1_000_003 + step + rank * 2**32,
    )


def rollout_counts(rb: RolloutBatch, dist: Dist | None = None) -> dict[str, float]:
    """Dropped and sampled rollouts (summed over processes when `dist` is given)."""
    counts = {"dropped": float(rb.dropped), "dropped_vision": float(rb.dropped_vision), "rollouts": float(rb.total)}
    return dist.sum(counts) if dist is not None else counts


def response_stats(rollouts: Sequence[Rollout], dist: Dist | None = None) -> dict[str, float]:
    """Token count, mean and max response length, and the share cut at max_new_tokens (over all
    processes when `dist` is given)."""
    lengths = [len(r.token_ids) for r in rollouts]
    sums = {"tokens": float(sum(lengths)), "n": float(len(lengths)),
            "truncated": float(sum(r.finish_reason == "length" for r in rollouts))}
    longest = {"max": float(max(lengths, default=0))}
    if dist is not None:
        sums, longest = dist.sum(sums), dist.max(longest)
    n = max(sums["n"], 1.0)
    return {
        "tokens": sums["tokens"],
        "response_len": sums["tokens"] / n,
        "response_len_max": longest["max"],
        "truncated": sums["truncated"] / n,
    }


def rollout_batch(run: "Run", prompts: Sequence[PromptEncoding], rollouts: Sequence[Rollout]) -> TeacherForcingBatch:
    """Teacher forcing of rollouts under per-conversation prompts (`prompts[r.prompt_index]`), on the run's device."""
    return device_batch(run, [prompts[r.prompt_index] for r in rollouts], [r.token_ids for r in rollouts])



def hf_engine(model: nn.Module, processor: Any, batch_size: int, cache: str = "dynamic") -> Engine:
    """The default rollout engine: the in-process HF engine around the live policy. `cache`:
    "static" preallocates the KV cache (the same samples; faster decoding on a GPU,
    docs/PERFORMANCE.md), uncompiled: a compiled decode step inside training is not measured."""
    from zoomless.engines.hf import HFEngine

    if cache == "static":
        return HFEngine(model, processor, batch_size=batch_size, cache_implementation="static", compile=False)
    return HFEngine(model, processor, batch_size=batch_size)


EngineFactory = Callable[[nn.Module, Any], Engine]


def rollout_engine(cfg: Any, run: "Run", make_engine: EngineFactory | None = None) -> Engine:
    """The engine a recipe samples with: `make_engine(model, processor)` around the live policy, or
    the in-process HF engine (`cfg.rollout_batch_size`, `cfg.rollout_cache`). The policy is left in
    train mode: an engine may switch it to eval mode; `rollout` does so only while sampling."""
    if make_engine is not None:
        engine = make_engine(run.model, run.processor)
    else:
        engine = hf_engine(run.model, run.processor, cfg.rollout_batch_size, cfg.rollout_cache)
    run.model.train()
    return engine
