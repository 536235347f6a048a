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
Every component is counted in the metrics a step logs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

from zoomless.engines.base import Conversation, Engine, SamplingParams, conversation
from zoomless.eval.grading import Grade, answer_span, grade, normalize
from zoomless.prompts import format_question, gold_letter, sample_form
from zoomless.sample import Sample

if TYPE_CHECKING:
    from zoomless.train.config import JudgeConfig

OnMalformed = Literal["wrong", "skip"]

_ANSWER_PAIR = re.compile(r"<answer>.*?</answer>", re.DOTALL | re.IGNORECASE)


# ----------------------------------------------------------------------------- rule components


def format_score(text: str) -> float:
    """1.0 when the response wraps its answer in <answer>...</answer> (any number of lines)."""
    return 1.0 if _ANSWER_PAIR.search(text) else 0.0


def over_length(text: str, max_answer_chars: int | None) -> bool:
    """Whether the answer span (or the whole response, without tags) reaches the character cap."""
    return max_answer_chars is not None and len(answer_span(text)[0]) >= max_answer_chars


def rules_decide(sample: Sample, g: Grade, form: str) -> bool:
    """Whether a rule grade is final: right by any rule, a definite option letter or number that
    was compared, a yes/no answer to a yes/no question, or a failed generation. An open answer
    that only failed the string match may still mean the gold ("crimson" for "red"): not final."""
    if g.correct or g.method in ("letter", "number", "error"):
        return True
    if sample_form(sample, form) == "open" and normalize(sample.answer or "") in ("yes", "no"):
        return g.parsed is not None
    return False


# ----------------------------------------------------------------------------- the judge

JUDGE_PROMPT = """You check whether a model's answer to a question means the same as the reference answer.
Do not solve the question yourself; the reference answer is correct. Ignore case, formatting, units
and wording; a multiple-choice answer matches if it picks the same option.

Question:
{question}

Reference answer:
{reference}

Model answer:
{response}

Does the model answer mean the same as the reference answer? Reply with exactly one word: Yes or No."""


def judge_reference(sample: Sample, form: str) -> str:
    """The gold as the judge sees it: the letter and its text for multiple choice, else the answer."""
    letter = gold_letter(sample) if sample_form(sample, form) == "mcq" else None
    if letter is not None and sample.options:
        return f"{letter}. {sample.answer}"
    return letter or sample.answer or ""


def judge_conversation(sample: Sample, response: str, form: str) -> Conversation:
    """A text-only prompt: the question (with its options), the reference answer, and the model's
    answer span (its <answer>, \\boxed{} or "Answer:" part when it marks one)."""
    text = JUDGE_PROMPT.format(
        question=format_question(sample, form=form), reference=judge_reference(sample, form),
        response=answer_span(response)[0],
    )
    return conversation([], text)


def parse_verdict(text: str) -> bool | None:
    """Strict: True for a reply whose answer span is exactly "yes", False for "no", else None.

    "Yes.", "**No**", "\\boxed{Yes}", "<answer>yes</answer>" and "Answer: No" count; "Yes and no",
    "Not yes", "The answer is probably yes" and an empty reply do not (no substring matching)."""
    span, _ = answer_span(text)
    verdict = normalize(span)
    return {"yes": True, "no": False}.get(verdict)


@dataclass
class JudgeStats:
    calls: int = 0  # responses sent to the judge
    yes: int = 0
    no: int = 0
    malformed: int = 0  # replies that were not a clear Yes or No
    errors: int = 0  # failed calls (the engine's error placeholders)


class Judge:
    """Any engine (in-process HF, or OpenAI-compatible HTTP) asked for a Yes/No verdict."""

    def __init__(
        self, engine: Engine, params: SamplingParams | None = None, on_malformed: OnMalformed = "wrong"
    ) -> None:
        if on_malformed not in ("wrong", "skip"):
            raise ValueError(f"on_malformed must be 'wrong' or 'skip', got {on_malformed!r}")
        self.engine = engine
        self.params = params or SamplingParams(max_new_tokens=256, temperature=0.0)
        self.on_malformed = on_malformed

    def verdicts(self, items: Sequence[tuple[Sample, str]], form: str) -> tuple[list[str], JudgeStats]:
        """One verdict per (sample, response): "yes", "no", "malformed" (not a clear Yes/No) or
        "error" (the call failed). Never raises for a bad reply or a failed endpoint."""
        if not items:
            return [], JudgeStats()
        convs = [judge_conversation(s, r, form) for s, r in items]
        params = SamplingParams(  # one verdict per item
            max_new_tokens=self.params.max_new_tokens, temperature=self.params.temperature,
            top_p=self.params.top_p, n=1, seed=self.params.seed,
        )
        try:
            replies = self.engine.generate(convs, params)
        except Exception:  # noqa: BLE001 - a judge outage must not end a training run
            replies = [[] for _ in convs]
        out: list[str] = []
        for gens in replies:
            g = gens[0] if gens else None
            if g is None or g.error is not None or g.finish_reason == "error":
                out.append("error")
            else:
                v = parse_verdict(g.text)
                out.append("malformed" if v is None else ("yes" if v else "no"))
        stats = JudgeStats(
            calls=len(out), yes=out.count("yes"), no=out.count("no"),
            malformed=out.count("malformed"), errors=out.count("error"),
        )
        return out, stats


def build_judge(cfg: "JudgeConfig") -> Judge:
    """The judge a `JudgeConfig` describes (an HTTP endpoint, or a local model directory)."""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    if cfg.base_url is not None:
        from zoomless.engines.openai_engine import OpenAIEngine

        key = None
        if cfg.api_key_env is not None:
            key = os.environ.get(cfg.api_key_env)
            if key is None:
                raise ValueError(f"judge.api_key_env: the environment variable {cfg.api_key_env} is not set")
        engine: Engine = OpenAIEngine(
            cfg.base_url, cfg.model, api_key=key or "none", max_concurrency=cfg.max_concurrency,
            timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, name=f"judge:{cfg.model}",
        )
    else:
        from zoomless.engines.hf import HFEngine

        engine = HFEngine.from_dir(cfg.model, device=None if cfg.device == "auto" else cfg.device, name="judge")
    return Judge(engine, params, cfg.on_malformed)


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
