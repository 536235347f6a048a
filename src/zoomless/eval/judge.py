"""The LLM judge: answers the grading rules cannot decide, judged Yes/No by any engine.

Used by evaluation (`single_pass`, `tool_loop`) and by GRPO rewards (`train/rewards.py`).

    judge = make_judge(base_url="http://127.0.0.1:8000/v1", model="Qwen3-30B-A3B-Instruct")
    verdicts, stats = judge.verdicts([(sample, model_output)], form="open")  # ["yes"]

Rules always go first (`rules_decide`): a definite option letter, a compared number, a yes/no
answer to a yes/no question or an exact match never costs a judge call. The judge sees the question,
the reference answer and the model's answer span (not the reasoning around it), greedy.

Verdicts are parsed strictly (`parse_verdict`): "Yes", "Yes.", "**No**", "\\boxed{Yes}" and
"<answer>no</answer>" count; anything else is "malformed", never a substring match ("Yes and no",
"probably yes"). A failed call is "error", never a silent "No". What a malformed or failed verdict
scores is the caller's choice (`on_malformed`: "wrong", or "skip" to leave the item out).

Two prompt wordings: `EVAL_JUDGE_PROMPT` is the public evaluation code's (Vision-OPD's
judge_qwenlm.py), so judged accuracies stay comparable with published ones; `JUDGE_PROMPT` is the
project's own, stricter about the reply format, used for training rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, Sequence

from zoomless.engines.base import Conversation, Engine, SamplingParams, conversation
from zoomless.eval.grading import Grade, answer_span, normalize
from zoomless.prompts import format_question, gold_letter, sample_form
from zoomless.sample import Sample

OnMalformed = Literal["wrong", "skip"]
VERDICTS = ("yes", "no", "malformed", "error")

# ----------------------------------------------------------------------------- prompts

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

EVAL_JUDGE_PROMPT = (
    "Your task is to judge whether the response expresses the same meaning as the answer of a question.\n"
    "The question is: {question}\n"
    "The answer is: {reference}\n"
    "The response is: {response}\n"
    "Please check and compare them and then judge. If the response is correct, your output should be Yes. "
    "Otherwise, your output should be No. Directly give me your output."
)

_PROMPT_NAMES = {JUDGE_PROMPT: "zoomless", EVAL_JUDGE_PROMPT: "reference"}


def judge_reference(sample: Sample, form: str) -> str:
    """The gold as the judge sees it: the letter and its text for multiple choice, else the answer."""
    letter = gold_letter(sample) if sample_form(sample, form) == "mcq" else None
    if letter is not None and sample.options:
        return f"{letter}. {sample.answer}"
    return letter or sample.answer or ""


def judge_conversation(sample: Sample, response: str, form: str, prompt: str = JUDGE_PROMPT) -> Conversation:
    """A text-only prompt: the question (with its options), the reference answer, and the model's
    answer span (its <answer>, \\boxed{} or "Answer:" part when it marks one)."""
    text = prompt.format(
        question=format_question(sample, form=form), reference=judge_reference(sample, form),
        response=answer_span(response)[0],
    )
    return conversation([], text)


# ----------------------------------------------------------------------------- when to ask


def rules_decide(sample: Sample, g: Grade, form: str) -> bool:
    """Whether a rule grade is final: right by any rule, a definite option letter or number that
    was compared, a yes/no answer to a yes/no question, or a failed generation. An open answer
    that only failed the string match may still mean the gold ("crimson" for "red"): not final."""
    if g.correct or g.method in ("letter", "number", "error"):
        return True
    if sample_form(sample, form) == "open" and normalize(sample.answer or "") in ("yes", "no"):
        return g.parsed is not None
    return False


def needs_judge(sample: Sample, g: Grade, prediction: str | None, form: str) -> bool:
    """Whether evaluation asks the judge: the rules did not decide (an open answer that failed the
    string and number match, or an answer where no option letter could be read) and there is an
    answer to judge. Empty answers and failed generations stay wrong by the rules."""
    if prediction is None or rules_decide(sample, g, form):
        return False
    return bool(answer_span(prediction)[0].strip())


def parse_verdict(text: str) -> bool | None:
    """Strict: True for a reply whose answer span is exactly "yes", False for "no", else None.

    "Yes.", "**No**", "\\boxed{Yes}", "<answer>yes</answer>" and "Answer: No" count; "Yes and no",
    "Not yes", "The answer is probably yes" and an empty reply do not (no substring matching)."""
    span, _ = answer_span(text)
    verdict = normalize(span)
    return {"yes": True, "no": False}.get(verdict)


# ----------------------------------------------------------------------------- the judge


@dataclass(frozen=True)
class Verdict:
    verdict: str  # one of VERDICTS
    reply: str  # the judge's text, or the error message of a failed call


@dataclass
class JudgeStats:
    calls: int = 0  # responses sent to the judge
    yes: int = 0
    no: int = 0
    malformed: int = 0  # replies that were not a clear Yes or No
    errors: int = 0  # failed calls (the engine's error placeholders)


class Judge:
    """Any engine (in-process HF, or OpenAI-compatible HTTP) asked for a Yes/No verdict.

    `model` and `base_url` label the judge in reports (default: the engine's name, in-process)."""

    def __init__(
        self,
        engine: Engine,
        params: SamplingParams | None = None,
        on_malformed: OnMalformed = "wrong",
        *,
        prompt: str = JUDGE_PROMPT,
        model: str | None = None,
        base_url: str | None = None,
    ) -> None:
        if on_malformed not in ("wrong", "skip"):
            raise ValueError(f"on_malformed must be 'wrong' or 'skip', got {on_malformed!r}")
        missing = [k for k in ("{question}", "{reference}", "{response}") if k not in prompt]
        if missing:
            raise ValueError(f"the judge prompt lacks the placeholder(s) {', '.join(missing)}")
        self.engine = engine
        self.params = params or SamplingParams(max_new_tokens=256, temperature=0.0)
        self.on_malformed = on_malformed
        self.prompt = prompt
        self.model = model or getattr(engine, "name", type(engine).__name__)
        self.base_url = base_url

    def describe(self) -> dict[str, object]:
        """What a report must say about the judge (and what a resumed run must match)."""
        return {
            "model": self.model,
            "base_url": self.base_url,
            "prompt": _PROMPT_NAMES.get(self.prompt, "custom"),
            "temperature": self.params.temperature,
            "max_new_tokens": self.params.max_new_tokens,
            "on_malformed": self.on_malformed,
        }

    def judge(self, items: Sequence[tuple[Sample, str]], form: str) -> list[Verdict]:
        """One verdict per (sample, response), with the judge's reply. Never raises for a bad
        reply or a failed endpoint: those are "malformed" and "error" verdicts."""
        if not items:
            return []
        convs = [judge_conversation(s, r, form, self.prompt) for s, r in items]
        params = SamplingParams(  # one verdict per item
            max_new_tokens=self.params.max_new_tokens, temperature=self.params.temperature,
            top_p=self.params.top_p, n=1, seed=self.params.seed,
        )
        try:
            replies = self.engine.generate(convs, params)
        except Exception as e:  # noqa: BLE001 - a judge outage must not end a run
            message = " ".join(str(e).split()) or type(e).__name__
            return [Verdict("error", message) for _ in convs]
        if len(replies) != len(convs):
            message = f"the judge returned {len(replies)} replies for {len(convs)} prompts"
            return [Verdict("error", message) for _ in convs]
        out: list[Verdict] = []
        for gens in replies:
            g = gens[0] if gens else None
            if g is None:
                out.append(Verdict("error", "the judge returned no reply"))
            elif g.error is not None or g.finish_reason == "error":
                out.append(Verdict("error", g.error or "generation failed"))
            else:
                v = parse_verdict(g.text)
                out.append(Verdict("malformed" if v is None else ("yes" if v else "no"), g.text))
        return out

    def verdicts(self, items: Sequence[tuple[Sample, str]], form: str) -> tuple[list[str], JudgeStats]:
        """One verdict per (sample, response): "yes", "no", "malformed" (not a clear Yes/No) or
        "error" (the call failed), and their counts."""
        out = [v.verdict for v in self.judge(items, form)]
        stats = JudgeStats(
            calls=len(out), yes=out.count("yes"), no=out.count("no"),
            malformed=out.count("malformed"), errors=out.count("error"),
        )
        return out, stats


def make_judge(
    base_url: str | None = None,
    model: str | None = None,
    model_dir: str | Path | None = None,
    api_key: str | None = None,
    *,
    on_malformed: OnMalformed = "wrong",
    max_new_tokens: int = 256,
    max_concurrency: int = 8,
    timeout_s: float = 60.0,
    max_retries: int = 3,
    device: str = "auto",
    temperature: float = 0.0,
    prompt: str = EVAL_JUDGE_PROMPT,
) -> Judge | None:
    """The judge the options describe, or None when none is asked for.

    `base_url` + `model`: an OpenAI-compatible endpoint serving `model` (vLLM, SGLang, `zoomless
    serve`, a provider). `model_dir`: a local HF model directory, run in-process on `device`.
    Verdicts are greedy by default (temperature 0: reproducible)."""
    if base_url is None and model is None and model_dir is None:
        return None
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    if base_url is not None:
        if model_dir is not None:
            raise ValueError("give the judge either a base_url (with its served model name) or a model_dir, not both")
        if not model:
            raise ValueError(f"the judge at {base_url} needs the served model name (judge model)")
        from zoomless.engines.openai_engine import OpenAIEngine

        engine: Engine = OpenAIEngine(
            base_url, model, api_key=api_key or "none", max_concurrency=max_concurrency,
            timeout_s=timeout_s, max_retries=max_retries, name=f"judge:{model}",
        )
        return Judge(engine, params, on_malformed, prompt=prompt, model=model, base_url=base_url)
    if model_dir is None:
        raise ValueError(f"judge model {model!r} needs a base_url (an endpoint serving it), or give a model_dir")
    if not Path(model_dir).is_dir():
        raise ValueError(f"judge model directory {model_dir}: no such folder")
    from zoomless.engines.hf import HFEngine

    engine = HFEngine.from_dir(model_dir, device=None if device == "auto" else device, name="judge")
    return Judge(engine, params, on_malformed, prompt=prompt, model=model or str(model_dir))


# ----------------------------------------------------------------------------- judging eval items


class JudgedItem(Protocol):
    """The fields of an evaluation item (`ItemResult`, `ToolItem`) that judging reads and sets."""

    prediction: str | None
    parsed: str | None
    correct: bool
    method: str
    verdict: str | None
    judge_reply: str | None
    excluded: bool


def pending(sample: Sample, item: JudgedItem, form: str) -> bool:
    """Whether an item still needs a verdict: the rules did not decide it, or its judge call failed
    (a rerun retries it)."""
    if item.method == "judge_error":
        return True
    if item.method.startswith("judge"):
        return False
    return needs_judge(sample, Grade(item.correct, item.parsed, item.method), item.prediction, form)


def judge_items(judge: Judge | None, pairs: Sequence[tuple[Sample, JudgedItem]], form: str) -> int:
    """Ask the judge about the items that need it (one engine call) and record each verdict on its
    item: method "judge" (Yes: right, No: wrong), "judge_malformed" or "judge_error" (wrong, or
    `excluded` from the denominator when the judge's on_malformed is "skip"). Returns how many were
    sent."""
    if judge is None:
        return 0
    todo = [(s, it) for s, it in pairs if pending(s, it, form)]
    verdicts = judge.judge([(s, it.prediction or "") for s, it in todo], form)
    for (_, it), v in zip(todo, verdicts):
        it.verdict, it.judge_reply = v.verdict, v.reply
        if v.verdict in ("yes", "no"):
            it.correct, it.method, it.excluded = v.verdict == "yes", "judge", False
        else:
            it.correct, it.method, it.excluded = False, f"judge_{v.verdict}", judge.on_malformed == "skip"
    return len(todo)


def judge_counts(items: Sequence[JudgedItem]) -> dict[str, int]:
    """How many items the judge saw, its verdicts, and how many left the denominator."""
    verdicts = [it.verdict for it in items if it.verdict is not None]
    return {
        "judged": len(verdicts),
        "yes": verdicts.count("yes"),
        "no": verdicts.count("no"),
        "malformed": verdicts.count("malformed"),
        "errors": verdicts.count("error"),
        "excluded": sum(bool(it.excluded) for it in items),
    }
