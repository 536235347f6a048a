"""Evaluation with an LLM judge (in-process engines): rules first, strict verdicts, per-item sources,
malformed and failed verdicts counted (wrong or excluded), failed calls retried on resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from zoomless.engines.base import Generation
from zoomless.engines.openai_engine import OpenAIEngine
from zoomless.eval.judge import EVAL_JUDGE_PROMPT, JUDGE_PROMPT, Judge, make_judge
from zoomless.eval.single_pass import PREDICTIONS, evaluate, load_result
from zoomless.eval.tool_loop import evaluate_tool_loop
from zoomless.sample import Sample

# (gold, options, model answer, how it is graded); the judge's replies are in JudgeEngine.REPLIES
CASES = [
    ("red", None, "red", "exact"),
    ("red", None, "crimson", "judge"),  # judge: "Yes."
    ("red", None, "blue", "judge"),  # judge: "No"
    ("red", None, "", "unparsable"),  # nothing to judge
    ("red", None, "maybe", "judge_malformed"),  # judge: "I cannot tell"
    ("red", None, "fail", "judge_error"),  # judge: HTTP 500
    ("circle", ("square", "circle", "star"), "B", "letter"),
    ("circle", ("square", "circle", "star"), "A", "letter"),  # a definite wrong letter: no judge
    ("circle", ("square", "circle", "star"), "the round one", "judge"),  # judge: "**Yes**"
    ("3", None, "seven", "number"),
    ("yes", None, "No.", "exact"),
]
RIGHT = {0, 1, 6, 8}
JUDGED = {1, 2, 4, 5, 8}


class Model:
    """Answers each question (by its first line) from a table; records what it was asked."""

    name = "model"

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.asked: list[str] = []

    def generate(self, conversations, params):
        out = []
        for conv in conversations:
            question = conv[-1]["content"][-1]["text"].split("\n")[0]
            self.asked.append(question)
            out.append([Generation(self.answers[question])])
        return out


class JudgeEngine:
    """A judge whose reply depends on the response in the (reference-worded) prompt."""

    name = "judge-engine"
    REPLIES = {"crimson": "Yes.", "blue": "No", "maybe": "I cannot tell", "fail": None, "the round one": "**Yes**"}

    def __init__(self, down: bool = False):
        self.down = down
        self.prompts: list[str] = []

    def generate(self, conversations, params):
        assert params.temperature == 0.0 and params.n == 1
        if self.down:
            raise ConnectionError("judge endpoint unreachable")
        out = []
        for conv in conversations:
            text = conv[-1]["content"][-1]["text"]
            self.prompts.append(text)
            reply = self.REPLIES[text.split("The response is: ")[1].split("\n")[0]]
            failed = Generation("", finish_reason="error", error="HTTP 500")
            out.append([failed if reply is None else Generation(reply)])
        return out


def judge(engine: JudgeEngine, on_malformed: str = "wrong", model: str | None = None) -> Judge:
    return Judge(engine, on_malformed=on_malformed, prompt=EVAL_JUDGE_PROMPT, model=model)


def make_cases(tmp_path: Path) -> tuple[list[Sample], Model]:
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "img.png")
    samples, answers = [], {}
    for i, (gold, options, answer, _) in enumerate(CASES):
        q = f"Q{i}: what is it?"
        samples.append(Sample(f"s{i}", str(tmp_path / "img.png"), q, gold, options, (8, 8, 40, 40), f"d{i % 2}"))
        answers[q] = answer
    return samples, Model(answers)


def test_rules_first_then_the_judge_with_sources_recorded(tmp_path):
    samples, model = make_cases(tmp_path)
    engine = JudgeEngine()
    out = tmp_path / "run"
    r = evaluate(samples, model, views=("full",), batch_size=4, out_dir=out, progress=False, judge=judge(engine))
    items = r.items["full"]
    assert [it.method for it in items] == [c[3] for c in CASES]
    assert {i for i, it in enumerate(items) if it.correct} == RIGHT
    assert {i for i, it in enumerate(items) if it.verdict is not None} == JUDGED
    assert len(engine.prompts) == len(JUDGED)  # rule-decided items never reached the judge
    assert [items[i].verdict for i in sorted(JUDGED)] == ["yes", "no", "malformed", "error", "yes"]
    assert items[4].judge_reply == "I cannot tell" and items[5].judge_reply == "HTTP 500"
    assert r.accuracy("full")["all"].n == len(CASES) and r.accuracy("full")["all"].correct == len(RIGHT)
    # the reference's wording, with the gold as letter and text for multiple choice
    assert engine.prompts[0].startswith("Your task is to judge whether the response expresses the same meaning")
    assert "The question is: Q1: what is it?" in engine.prompts[0] and "The answer is: red\n" in engine.prompts[0]
    assert "The answer is: B. circle\nThe response is: the round one\n" in engine.prompts[-1]

    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["judge"] == {"model": "judge-engine", "base_url": None, "prompt": "reference",
                                        "temperature": 0.0, "max_new_tokens": 256, "on_malformed": "wrong"}
    assert res["views"]["full"]["judge"] == {"judged": 5, "yes": 2, "no": 1, "malformed": 1, "errors": 1, "excluded": 0}
    assert res["views"]["full"]["methods"]["judge"] == 3
    lines = [json.loads(x) for x in (out / PREDICTIONS).read_text().splitlines()]
    assert lines[1]["verdict"] == "yes" and lines[1]["method"] == "judge" and lines[1]["correct"] is True
    summary = (out / "summary.md").read_text()
    assert "| judged | judge yes | judge no | judge malformed | judge failed | excluded |" in summary
    assert "| 5 | 2 | 1 | 1 | 1 | 0 |" in summary
    assert "the judge judge-engine (in-process; reference prompt, temperature 0.0)" in summary
    assert "malformed or failed verdicts count as wrong" in summary


def test_excluded_verdicts_leave_every_denominator(tmp_path):
    samples, model = make_cases(tmp_path)
    r = evaluate(samples, model, views=("full", "crop"), out_dir=tmp_path / "run", progress=False,
                 judge=judge(JudgeEngine(), on_malformed="skip"))
    for v in ("full", "crop"):
        acc = r.accuracy(v)["all"]
        assert (acc.n, acc.correct) == (len(CASES) - 2, len(RIGHT))
        assert [it.id for it in r.items[v] if it.excluded] == ["s4", "s5"]
    assert r.gap()["all"].n == len(CASES) - 2
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["views"]["crop"]["judge"]["excluded"] == 2
    assert "are left out of the denominator" in (tmp_path / "run" / "summary.md").read_text()


def test_failed_judge_calls_are_recorded_then_retried_on_resume(tmp_path):
    samples, model = make_cases(tmp_path)
    out = tmp_path / "run"
    first = evaluate(samples, model, views=("full",), batch_size=4, out_dir=out, progress=False,
                     judge=judge(JudgeEngine(down=True)))
    items = first.items["full"]
    assert [i for i, it in enumerate(items) if it.method == "judge_error"] == sorted(JUDGED)  # never a silent "No"
    assert items[1].judge_reply == "judge endpoint unreachable" and not items[1].correct
    assert first.judge_counts("full")["errors"] == len(JUDGED)

    again, engine = Model(model.answers), JudgeEngine()
    second = evaluate(samples, again, views=("full",), batch_size=4, out_dir=out, progress=False, judge=judge(engine))
    assert again.asked == [] and len(engine.prompts) == len(JUDGED)  # only the failed verdicts were asked again
    assert [it.method for it in second.items["full"]] == [c[3] for c in CASES]
    assert load_result(out).accuracy("full") == second.accuracy("full")
    assert second.accuracy("full")["all"].correct == len(RIGHT)
    # a finished folder asks the model nothing and the judge only what failed again (its HTTP 500);
    # a folder judged by another judge (or by none) is refused
    third, engine = Model(model.answers), JudgeEngine()
    evaluate(samples, third, views=("full",), out_dir=out, progress=False, judge=judge(engine))
    assert third.asked == [] and len(engine.prompts) == 1 and "The response is: fail\n" in engine.prompts[0]
    with pytest.raises(ValueError, match="judge"):
        other = judge(JudgeEngine(), model="other")
        evaluate(samples, model, views=("full",), out_dir=out, progress=False, judge=other)
    with pytest.raises(ValueError, match="judge"):
        evaluate(samples, model, views=("full",), out_dir=out, progress=False)


def test_tool_loop_final_answers_are_judged(tmp_path):
    samples, model = make_cases(tmp_path)
    engine = JudgeEngine()
    out = tmp_path / "tool"
    r = evaluate_tool_loop(samples, model, max_turns=2, out_dir=out, progress=False, judge=judge(engine))
    assert [it.method for it in r.items] == [c[3] for c in CASES]
    assert r.accuracy()["all"].correct == len(RIGHT) and len(engine.prompts) == len(JUDGED)
    res = json.loads((out / "results.json").read_text())
    assert res["judge"]["judged"] == 5 and res["settings"]["judge"]["model"] == "judge-engine"
    summary = (out / "summary.md").read_text()
    assert "| judge malformed | 1 |" in summary and "Graded by rules, then the judge judge-engine" in summary


def test_make_judge_options():
    assert make_judge() is None
    j = make_judge(base_url="http://127.0.0.1:9/v1", model="Qwen3-30B", api_key="k", on_malformed="skip")
    assert isinstance(j.engine, OpenAIEngine) and j.engine.model == "Qwen3-30B" and j.engine._api_key == "k"
    assert j.describe() == {"model": "Qwen3-30B", "base_url": "http://127.0.0.1:9/v1", "prompt": "reference",
                            "temperature": 0.0, "max_new_tokens": 256, "on_malformed": "skip"}
    assert j.prompt == EVAL_JUDGE_PROMPT and j.params.temperature == 0.0
    j.engine.close()
    with pytest.raises(ValueError, match="needs the served model name"):
        make_judge(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="needs a base_url"):
        make_judge(model="Qwen3-30B")
    with pytest.raises(ValueError, match="not both"):
        make_judge(base_url="http://127.0.0.1:9/v1", model="m", model_dir="/tmp")
    with pytest.raises(ValueError, match="no such folder"):
        make_judge(model_dir="/nonexistent/judge")
    with pytest.raises(ValueError, match="on_malformed"):
        Judge(JudgeEngine(), on_malformed="ignore")
    with pytest.raises(ValueError, match="placeholder"):
        Judge(JudgeEngine(), prompt="Is {response} right?")
    assert Judge(JudgeEngine()).describe()["prompt"] == "zoomless" and Judge(JudgeEngine()).prompt == JUDGE_PROMPT
