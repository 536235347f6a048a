"""Rewards for GRPO: rule-based accuracy, answer format, a length cap, and an LLM judge.

For one response to one sample (spec 3.2, with its bugs fixed):
  1. format = 1 if the response holds an <answer>...</answer> pair (multi-line answers too), else 0;
  2. accuracy by the rules of `eval/grading.py` (the option letter, a normalized string, a number);
  3. an answer span of `max_answer_chars` characters or more scores accuracy 0 (no rambling), and
     the cap is counted, not silent;
  4. an answer the rules cannot decide (an open answer that matches no gold form, an unparsable one)
     goes to the judge when there is one, else it is wrong. The rules always go first: a decided
     answer never costs a judge call;
  5. reward = (1 - format_weight) * accuracy + format_weight * format (format_weight 0: pure accuracy).
The judge sees the answer span (not the reasoning around it) and must answer exactly Yes or No. A
reply that is anything else ("malformed") and a failed call ("error") are scored as configured:
wrong (accuracy 0), or skip (the rollout has no reward and leaves the loss); neither ever raises.
Every component is counted in the metrics a step logs. The judge itself (prompts, strict verdict
parsing, engines) is `eval/judge.py`, shared with evaluation.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from zoomless.eval.grading import answer_span, grade
from zoomless.eval.judge import (  # the judge lives with grading; re-exported here for training code
    JUDGE_PROMPT,
    Judge,
    JudgeStats,
    OnMalformed,
    judge_conversation,
    judge_reference,
    make_judge,
    parse_verdict,
    rules_decide,
)
from zoomless.sample import Sample

if TYPE_CHECKING:
    from zoomless.train.config import JudgeConfig

__all__ = [
    "JUDGE_PROMPT", "Judge", "JudgeStats", "OnMalformed", "Reward", "build_judge", "format_score",
    "judge_conversation", "judge_reference", "over_length", "parse_verdict", "reward_metrics", "rules_decide",
    "score_responses",
]

_ANSWER_PAIR = re.compile(r"<answer>.*?</answer>", re.DOTALL | re.IGNORECASE)


# ----------------------------------------------------------------------------- rule components


def format_score(text: str) -> float:
    """1.0 when the response wraps its answer in <answer>...</answer> (any number of lines)."""
    return 1.0 if _ANSWER_PAIR.search(text) else 0.0


def over_length(text: str, max_answer_chars: int | None) -> bool:
    """Whether the answer span (or the whole response, without tags) reaches the character cap."""
    return max_answer_chars is not None and len(answer_span(text)[0]) >= max_answer_chars


def build_judge(cfg: "JudgeConfig") -> Judge:
    """The judge a `JudgeConfig` describes (an HTTP endpoint, or a local model directory), with the
    project's judge prompt."""
    key = None
    if cfg.base_url is not None and cfg.api_key_env is not None:
        key = os.environ.get(cfg.api_key_env)
        if key is None:
            raise ValueError(f"judge.api_key_env: the environment variable {cfg.api_key_env} is not set")
    judge = make_judge(
        base_url=cfg.base_url,
        model=cfg.model if cfg.base_url is not None else None,
        model_dir=cfg.model if cfg.base_url is None else None,
        api_key=key,
        on_malformed=cfg.on_malformed,
        max_new_tokens=cfg.max_new_tokens,
        max_concurrency=cfg.max_concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        device=cfg.device,
        temperature=cfg.temperature,
        prompt=JUDGE_PROMPT,
    )
    assert judge is not None  # cfg.model is required
    return judge


# ----------------------------------------------------------------------------- scoring a batch


@dataclass
class Reward:
    total: float | None  # what the advantage uses; None: skipped (leaves the loss)
    accuracy: float
    format: float
    capped: bool  # the answer reached max_answer_chars
    source: str  # "rules", "judge", "judge_malformed", "judge_error", "capped" or "unjudged"


def score_responses(
    samples: Sequence[Sample],
    responses: Sequence[str],
    form: str = "mcq",
    *,
    format_weight: float = 0.0,
    max_answer_chars: int | None = 300,
    judge: Judge | None = None,
) -> tuple[list[Reward], dict[str, float]]:
    """Score each (sample, response) pair; return the rewards and the step's reward metrics."""
    if len(samples) != len(responses):
        raise ValueError(f"{len(samples)} samples but {len(responses)} responses")
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    fmt = [format_score(r) for r in responses]
    capped = [over_length(r, max_answer_chars) for r in responses]
    accuracy: list[float | None] = []
    source: list[str] = []
    for s, r, cap in zip(samples, responses, capped):
        if cap:
            accuracy.append(0.0)
            source.append("capped")
            continue
        g = grade(s, r, form)
        decided = rules_decide(s, g, form)
        if decided or judge is None:
            accuracy.append(float(g.correct))
            source.append("rules" if decided else "unjudged")
        else:
            accuracy.append(None)
            source.append("judge")

    pending = [i for i, a in enumerate(accuracy) if a is None]
    stats = JudgeStats()
    if pending:
        verdicts, stats = judge.verdicts([(samples[i], responses[i]) for i in pending], form)
        for i, v in zip(pending, verdicts):
            if v in ("yes", "no"):
                accuracy[i] = float(v == "yes")
            else:
                source[i] = f"judge_{v}"
                accuracy[i] = 0.0 if judge.on_malformed == "wrong" else None

    rewards = []
    for a, f, cap, src in zip(accuracy, fmt, capped, source):
        total = None if a is None else (1.0 - format_weight) * a + format_weight * f
        rewards.append(Reward(total, 0.0 if a is None else a, f, cap, src))
    return rewards, reward_metrics(rewards, stats)


def reward_metrics(rewards: Sequence[Reward], stats: JudgeStats) -> dict[str, float]:
    """Means over the scored responses, counts for the judge."""
    scored = [r for r in rewards if r.total is not None]
    n, k = max(len(rewards), 1), max(len(scored), 1)
    return {
        "reward": sum(r.total for r in scored) / k,
        "reward/accuracy": sum(r.accuracy for r in scored) / k,
        "reward/format": sum(r.format for r in rewards) / n,
        "reward/capped": sum(r.capped for r in rewards) / n,
        "reward/skipped": float(len(rewards) - len(scored)),
        "reward/by_rules": sum(r.source == "rules" for r in rewards) / n,
        "judge/calls": float(stats.calls),
        "judge/yes": float(stats.yes),
        "judge/no": float(stats.no),
        "judge/malformed": float(stats.malformed),
        "judge/errors": float(stats.errors),
    }
