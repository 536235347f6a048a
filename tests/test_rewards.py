"""GRPO rewards: rule accuracy, format, the length cap, and LLM judges (scripted and a random tiny
model) served by `zoomless serve` on loopback: rules go first, malformed verdicts never crash."""

import pytest
import torch

from zoomless.engines.base import Generation, SamplingParams
from zoomless.engines.hf import HFEngine
from zoomless.engines.openai_engine import OpenAIEngine
from zoomless.models.loading import load_vlm
from zoomless.models.tiny import build_tiny_vlm
from zoomless.sample import Sample
from zoomless.serve import create_app, running
from zoomless.train.config import JudgeConfig
from zoomless.train.rewards import (
    Judge,
    build_judge,
    format_score,
    judge_conversation,
    over_length,
    parse_verdict,
    score_responses,
)

COLOUR = Sample("colour", "x.png", "What colour is the car?", answer="red")
COUNT = Sample("count", "x.png", "How many dots are there?", answer="3")
YESNO = Sample("yesno", "x.png", "Is there a dog?", answer="yes")
MCQ = Sample("mcq", "x.png", "Which shape is it?", answer="circle", options=("square", "circle", "star"))


def test_format_and_length_cap() -> None:
    assert format_score("think... <answer>B</answer>") == 1.0
    assert format_score("<answer>\nline one\nline two\n</answer>") == 1.0  # multi-line answers count
    assert format_score("<answer>B") == 0.0 and format_score("B") == 0.0
    assert over_length("x" * 300, 300) and not over_length("x" * 299, 300)
    assert not over_length("reasoning " * 100 + "<answer>B</answer>", 300)  # the answer span is measured
    assert not over_length("x" * 1000, None)


@pytest.mark.parametrize(
    "reply, verdict",
    [("Yes", True), ("no", False), ("Yes.", True), ("**No**", False), ("\\boxed{Yes}", True),
     ("<answer>yes</answer>", True), ("Answer: No", False), ("Yes and no", None), ("Not yes", None),
     ("The answer is probably yes", None), ("", None), ("YesYes", None), ("是", None)],
)
def test_verdicts_are_parsed_strictly(reply: str, verdict: bool | None) -> None:
    assert parse_verdict(reply) is verdict


def test_rule_rewards_components() -> None:
    samples = [MCQ, MCQ, MCQ, COLOUR, COUNT, COUNT, YESNO, COLOUR]
    responses = ["B", "(A)", "<answer>B</answer>", "Red.", "three", "4", "No.", "z" * 400]
    rewards, m = score_responses(samples, responses, "mcq", format_weight=0.5, max_answer_chars=300)
    assert [r.accuracy for r in rewards] == [1, 0, 1, 1, 1, 0, 0, 0]
    assert [r.format for r in rewards] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert [r.total for r in rewards] == [0.5, 0, 1.0, 0.5, 0.5, 0, 0, 0]  # (1 - w) accuracy + w format
    assert [r.source for r in rewards] == ["rules"] * 7 + ["capped"]
    assert m["reward/capped"] == 1 / 8 and m["reward/format"] == 1 / 8 and m["reward/accuracy"] == 4 / 8
    assert m["reward"] == 2.5 / 8 and m["judge/calls"] == 0
    # an open answer the rules cannot settle, with no judge, is wrong (and counted as unjudged)
    rewards, _ = score_responses([COLOUR], ["crimson"], "open")
    assert rewards[0].total == 0.0 and rewards[0].source == "unjudged"
    with pytest.raises(ValueError, match="2 samples but 1 responses"):
        score_responses([COLOUR, COUNT], ["red"])


class Counting:
    """In-process judge engine: "Yes" when the model answer contains "crimson", else "No"."""

    name = "counting"

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def generate(self, conversations, params):
        out = []
        for conv in conversations:
            text = conv[-1]["content"][-1]["text"]
            self.prompts.append(text)
            answer = text.split("Model answer:\n")[1].split("\n\n")[0]
            out.append([Generation(text="Yes" if "crimson" in answer else "No", token_ids=[1])])
        return out


def test_rules_first_the_judge_sees_only_undecided_answers() -> None:
    engine = Counting()
    judge = Judge(engine)
    samples = [COLOUR, COLOUR, COLOUR, COUNT, COUNT, YESNO, MCQ, MCQ]
    responses = ["red", "crimson", "blue", "3", "seven", "yes", "B", "banana"]
    rewards, m = score_responses(samples, responses, "mcq", judge=judge)
    # decided by rules: "red" (exact), "3" and "seven" (numbers), "yes" (yes/no), "B" (a letter)
    assert len(engine.prompts) == m["judge/calls"] == 3
    assert [r.source for r in rewards] == ["rules", "judge", "judge", "rules", "rules", "rules", "rules", "judge"]
    assert [r.accuracy for r in rewards] == [1, 1, 0, 1, 0, 1, 1, 0]
    assert m["judge/yes"] == 1 and m["judge/no"] == 2
    # the prompt names the question with its options, the reference (letter and text) and the answer
    mcq_prompt = engine.prompts[-1]
    assert "A. square\nB. circle\nC. star" in mcq_prompt and "Reference answer:\nB. circle" in mcq_prompt
    assert "Model answer:\nbanana" in mcq_prompt
    # everything decided: no call at all
    engine.prompts.clear()
    score_responses([COLOUR, MCQ], ["red", "C"], "mcq", judge=judge)
    assert engine.prompts == []


class Scripted:
    """A served judge: its reply depends on the model answer in the prompt; "fail" is an engine error."""

    name = "scripted"
    replies = {"crimson": "Yes", "scarlet": "\\boxed{Yes}", "blue": "No.", "teal": "I am not sure, maybe yes"}

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, conversations, params):
        out = []
        for conv in conversations:
            self.calls += 1
            answer = conv[-1]["content"][-1]["text"].split("Model answer:\n")[1].split("\n\n")[0]
            if answer == "fail":
                out.append([Generation(text="", finish_reason="error", error="boom")])
            else:
                out.append([Generation(text=self.replies[answer], token_ids=[1])])
        return out


@pytest.mark.parametrize("mode", ["wrong", "skip"])
def test_served_scripted_judge_yes_no_garbage_and_errors(mode: str) -> None:
    engine = Scripted()
    with running(create_app(engine, "judge", api_key="k")) as url:
        client = OpenAIEngine(url + "/v1", "judge", api_key="k", max_retries=0)
        judge = Judge(client, SamplingParams(max_new_tokens=16), on_malformed=mode)
        responses = ["crimson", "scarlet", "blue", "teal", "fail", "red"]
        rewards, m = score_responses([COLOUR] * 6, responses, "open", judge=judge)
        client.close()
    assert engine.calls == 5  # "red" was settled by the rules
    assert (m["judge/calls"], m["judge/yes"], m["judge/no"], m["judge/malformed"], m["judge/errors"]) == (5, 2, 1, 1, 1)
    assert [r.source for r in rewards] == ["judge", "judge", "judge", "judge_malformed", "judge_error", "rules"]
    if mode == "wrong":
        assert [r.total for r in rewards] == [1, 1, 0, 0, 0, 1]
        assert m["reward/skipped"] == 0 and m["reward"] == 3 / 6
    else:
        assert [r.total for r in rewards] == [1, 1, 0, None, None, 1]
        assert m["reward/skipped"] == 2 and m["reward"] == 3 / 4


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    """A random tiny model served on loopback: whatever it says is not a clear Yes or No."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model_dir = build_tiny_vlm(tmp_path_factory.mktemp("judge") / "judge", size="test", seed=0)
    model, processor = load_vlm(model_dir, dtype=torch.float32, device="cpu")
    engine = HFEngine(model, processor)
    with running(create_app(engine, "judge")) as url:
        yield url, engine, model_dir
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["wrong", "skip"])
def test_random_model_judge_is_malformed_scored_as_configured(tiny_judge, mode: str) -> None:
    url, engine, _ = tiny_judge
    before = engine.stats["prompts"]
    judge = build_judge(JudgeConfig(model="judge", base_url=url + "/v1", max_new_tokens=6, on_malformed=mode))
    rewards, m = score_responses([COLOUR, COLOUR, MCQ], ["crimson", "red", "banana"], "mcq", judge=judge)
    judge.engine.close()
    assert engine.stats["prompts"] - before == 2 and m["judge/calls"] == 2  # the model really was asked
    assert m["judge/malformed"] == 2 and m["judge/yes"] == m["judge/no"] == m["judge/errors"] == 0
    expected = 0.0 if mode == "wrong" else None
    assert [r.total for r in rewards] == [expected, 1.0, expected]
    assert m["reward/skipped"] == (0 if mode == "wrong" else 2)


def test_unreachable_judge_is_an_error_not_a_crash(tiny_judge) -> None:
    judge = build_judge(JudgeConfig(model="j", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout_s=5))
    rewards, m = score_responses([COLOUR], ["crimson"], "open", judge=judge)
    judge.engine.close()
    assert m["judge/errors"] == 1 and rewards[0].total == 0.0 and rewards[0].source == "judge_error"

    class Raises:
        name = "raises"

        def generate(self, conversations, params):
            raise RuntimeError("GPU fell off")

    rewards, m = score_responses([COLOUR], ["crimson"], "open", judge=Judge(Raises(), on_malformed="skip"))
    assert m["judge/errors"] == 1 and rewards[0].total is None


def test_build_judge_local_model_and_api_key_env(tiny_judge, monkeypatch) -> None:
    _, _, model_dir = tiny_judge
    judge = build_judge(JudgeConfig(model=str(model_dir), device="cpu", max_new_tokens=4))
    assert isinstance(judge.engine, HFEngine) and judge.params.temperature == 0.0
    [verdict], stats = judge.verdicts([(COLOUR, "crimson")], "open")  # in-process, no server
    assert verdict == "malformed" and stats.calls == 1
    with pytest.raises(ValueError, match="judge.api_key_env: the environment variable ZL_JUDGE_KEY is not set"):
        build_judge(JudgeConfig(model="j", base_url="http://127.0.0.1:9/v1", api_key_env="ZL_JUDGE_KEY"))
    monkeypatch.setenv("ZL_JUDGE_KEY", "secret")
    j = build_judge(JudgeConfig(model="j", base_url="http://127.0.0.1:9/v1", api_key_env="ZL_JUDGE_KEY"))
    assert j.engine._api_key == "secret"
    j.engine.close()


def test_judge_prompt_for_open_questions() -> None:
    text = judge_conversation(COUNT, "  four ", "open")[-1]["content"][-1]["text"]
    assert "How many dots are there?" in text and "Reference answer:\n3\n" in text and "Model answer:\nfour\n" in text
    # only the answer span reaches the judge, not the reasoning around it
    text = judge_conversation(COUNT, "I count them one by one... <answer>four</answer>", "open")[-1]["content"][-1]["text"]
    assert "Model answer:\nfour\n" in text and "one by one" not in text
