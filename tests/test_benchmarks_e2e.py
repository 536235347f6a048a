"""Every public benchmark format, end to end: a fixture with the exact public column names (built
with the helpers of test_benchmarks.py) is detected, loaded and evaluated by a scripted engine that
answers the gold for some items and a wrong letter, value or garbage for the others; the accuracy,
the per-category breakdown, the benchmark's own metric, results.json and summary.md are checked.
Then a random tiny model on one fixture, and a judge served on loopback (Yes, No., garbage, 500)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from test_benchmarks import (
    BLUE,
    GREEN,
    RED,
    encoded,
    hf_image,
    hrbench_rows,
    mme_rows,
    mmvp_folder,
    vstar_file,
    write_parquet,
    zoombench_rows,
)

from zoomless.engines.base import Generation
from zoomless.eval.benchmarks import detect_benchmark, load_benchmark
from zoomless.eval.judge import make_judge
from zoomless.eval.single_pass import evaluate
from zoomless.prompts import gold_letter, n_options
from zoomless.sample import LETTERS, Sample
from zoomless.serve import running

# ----------------------------------------------------------------------------- fixtures


def zoombench(tmp: Path) -> Path:
    rows = zoombench_rows()
    more = [dict(r, id=f"zb-{i + 2}", query=r["query"].replace("?", f" (copy {i})?")) for i, r in enumerate(rows)]
    return write_parquet(tmp / "ZoomBench" / "data" / "test.parquet", rows + more)


def vstar(tmp: Path) -> Path:
    return vstar_file(tmp, n=6)


def hrbench(size: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        return write_parquet(tmp / f"hr_bench_{size}.parquet", hrbench_rows(4))

    return build


def mme(kind: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        rows = []
        for i in range(4):
            category = ["autonomous_driving", "remote_sensing"][i % 2]
            row = dict(mme_rows()[0], index=i, answer="ABCD"[i], category=category)
            row["question"] = f"限速是多少？第{i}题" if kind == "cn" else f"What is the speed limit, sign {i}?"
            rows.append(row)
        folder = {"en": "MME-RealWorld-Lmms-eval", "cn": "MME-RealWorld-CN-Lmms-eval",
                  "lite": "MME-RealWorld-lite-lmms-eval"}[kind]  # the public repository names
        return write_parquet(tmp / folder / "data" / "train-00000.parquet", rows)

    return build


def mmstar(tmp: Path) -> Path:
    text_columns = ("index", "question", "answer", "category", "l2_category")
    schema = pa.schema([(k, pa.string()) for k in text_columns] + [("image", pa.binary())])
    rows = [
        {"index": str(i), "question": f"Which one is shown {i}?\nOptions: A: a cat, B: a dog, C: a car, D: a tree",
         "answer": "ABCD"[i % 4], "category": ["coarse perception", "instance reasoning"][i % 2],
         "l2_category": "image scene", "image": encoded(RED, fmt="JPEG")}
        for i in range(5)
    ]
    return write_parquet(tmp / "mmstar.parquet", rows, schema)


def pope(tmp: Path) -> Path:
    rows = [
        {"id": str(i), "question_id": str(i), "question": f"Is there a {obj} in the image?", "answer": ans,
         "image_source": f"COCO_{i}", "category": split, "image": hf_image(encoded(BLUE))}
        for i, (split, obj, ans) in enumerate(
            [("adversarial", "dog", "yes"), ("adversarial", "cat", "no"), ("adversarial", "car", "yes"),
             ("random", "cup", "no"), ("random", "bus", "yes"), ("random", "kite", "no")]
        )
    ]
    return write_parquet(tmp / "POPE" / "Full" / "test-00000-of-00001.parquet", rows)


def cvbench(tmp: Path) -> Path:
    for kind, n in (("2D", 3), ("3D", 2)):
        rows = [{"idx": i, "type": kind, "task": "Count" if kind == "2D" else "Depth", "image": hf_image(encoded(RED)),
                 "prompt": f"{kind} question {i}? Select from the following choices.\n(A) 3\n(B) 2\n(C) 1",
                 "answer": "(B)", "source": "ADE20K"} for i in range(n)]
        write_parquet(tmp / "CV-Bench" / f"test_{kind.lower()}.parquet", rows)
    return tmp / "CV-Bench"


def mmvp(tmp: Path) -> Path:
    root = mmvp_folder(tmp)  # one pair; a second pair is added with the same columns
    with (root / "Questions.csv").open("a", newline="") as f:
        w = csv.writer(f)
        w.writerow([3, "Is the door open or closed?", "(a) Open (b) Closed", "(b)"])
        w.writerow([4, "Is the door open or closed?", "(a) Open (b) Closed", "(a) Open"])
    for i, color in ((3, BLUE), (4, RED)):
        Image.new("RGB", (16, 16), color).save(root / "MMVP Images" / f"{i}.jpg")
    return root


def visualprobe(tmp: Path) -> Path:
    for level, n in (("Easy", 2), ("Hard", 3)):
        folder = tmp / "VisualProbe" / f"VisualProbe_{level}"
        (folder / "images").mkdir(parents=True)
        rows = []
        for i in range(n):
            Image.new("RGB", (20, 20), GREEN).save(folder / "images" / f"{i}.png")
            gold = str(40 + i) if i % 2 == 0 else f"<answer>Acme{i}</answer>"
            problem = f"<image>\nWhat is written on item {i}?"
            rows.append({"problem": problem, "solution": gold, "images": [f"images/{i}.png"]})
        (folder / "val.json").write_text(json.dumps(rows))
    return tmp / "VisualProbe"


FIXTURES: dict[str, Callable[[Path], Path]] = {
    "zoombench": zoombench,
    "vstar": vstar,
    "hrbench-4k": hrbench("4k"),
    "hrbench-8k": hrbench("8k"),
    "mme-realworld": mme("en"),
    "mme-realworld-cn": mme("cn"),
    "mme-realworld-lite": mme("lite"),
    "mmstar": mmstar,
    "pope": pope,
    "cvbench": cvbench,
    "mmvp": mmvp,
    "visualprobe": visualprobe,
}

# ----------------------------------------------------------------------------- the scripted model

GARBAGE = "¯\\_(ツ)_/¯ dunno"


def right_answer(s: Sample, k: int) -> str:
    """The gold, written in one of several styles a model uses."""
    letter = gold_letter(s)
    if letter is not None:
        return [letter, f"({letter})", f"<answer>{letter}</answer>", f"The answer is {letter}."][k % 4]
    return [s.answer, f"<answer>{s.answer}</answer>", f"{s.answer}."][k % 3]


def wrong_answer(s: Sample, k: int) -> str:
    """Garbage, or a definite wrong letter / number / yes-no / text."""
    if k % 2:
        return GARBAGE
    letter = gold_letter(s)
    if letter is not None:
        return next(x for x in LETTERS[: n_options(s)] if x != letter)
    if s.answer in ("yes", "no"):
        return "No." if s.answer == "yes" else "Yes"
    return str(int(s.answer) + 1) if s.answer.isdigit() else "Zenith"


class Scripted:
    """Answers the i-th question asked with the i-th scripted answer, and checks it was asked the
    benchmark's prompt as published (sent as is, but for surrounding whitespace)."""

    name = "scripted"

    def __init__(self, script: list[tuple[str, str]]):
        self.script = script
        self.calls = 0

    def generate(self, conversations, params):
        out = []
        for conv in conversations:
            question, answer = self.script[self.calls]
            assert conv[-1]["content"][-1]["text"] == question  # sent exactly as the benchmark writes it
            self.calls += 1
            out.append([Generation(answer)])
        return out


def script_for(samples: list[Sample]) -> tuple[list[tuple[str, str]], set[str]]:
    """Right for two items of three, wrong (a definite answer or garbage, in turn) for the third."""
    script, right = [], set()
    for i, s in enumerate(samples):
        if i % 3 != 1:
            script.append((s.question, right_answer(s, i)))
            right.add(s.id)
        else:
            script.append((s.question, wrong_answer(s, i // 3 + 1)))
    return script, right


def expected_by_category(samples: list[Sample], right: set[str]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for s in samples:
        n, k = out.get(s.dimension or "other", (0, 0))
        out[s.dimension or "other"] = (n + 1, k + (s.id in right))
    return out


@pytest.mark.parametrize("name", list(FIXTURES))
def test_public_format_end_to_end(tmp_path, name):
    path = FIXTURES[name](tmp_path / "data")
    assert detect_benchmark(path) == name
    samples = load_benchmark(name, path)
    assert len(samples) >= 4 and all(s.meta["benchmark"] == name for s in samples)
    script, right = script_for(samples)
    engine = Scripted(script)
    out = tmp_path / "run"
    r = evaluate(samples, engine, views=("full",), batch_size=3, out_dir=out, progress=False, benchmark=name)
    assert engine.calls == len(samples)

    acc = r.accuracy("full")
    assert acc["all"].n == len(samples) and acc["all"].acc == pytest.approx(len(right) / len(samples))
    assert {i.id for i in r.items["full"] if i.correct} == right
    expected = expected_by_category(samples, right)
    assert {d: (a.n, a.correct) for d, a in acc.items() if d != "all"} == expected

    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["benchmark"] == name and res["settings"]["judge"] is None
    assert res["views"]["full"]["accuracy"]["all"]["correct"] == len(right)
    for d, (n, k) in expected.items():
        assert (res["views"]["full"]["accuracy"][d]["n"], res["views"]["full"]["accuracy"][d]["correct"]) == (n, k)
    assert sum(res["views"]["full"]["methods"].values()) == len(samples)
    garbage = {s.id for s, (_, a) in zip(samples, script) if a == GARBAGE}
    assert garbage and all(i.method in ("unparsable", "exact") for i in r.items["full"] if i.id in garbage)
    summary = (out / "summary.md").read_text()
    assert f"| all | {len(samples)} | {100 * len(right) / len(samples):.1f} [" in summary
    assert "Graded by rules only" in summary
    check_benchmark_metric(name, samples, right, res, summary)


def check_benchmark_metric(name: str, samples: list[Sample], right: set[str], res: dict, summary: str) -> None:
    """The special metric, recomputed here by hand from the script."""
    metric = res.get("benchmark_metrics", {}).get("full")
    if name not in ("cvbench", "visualprobe", "pope", "mmvp"):
        assert metric is None and "## Benchmark metric" not in summary
        return
    assert metric["benchmark"] == name and "## Benchmark metric" in summary
    if name in ("cvbench", "visualprobe"):
        key = (lambda s: s.meta["type"]) if name == "cvbench" else (lambda s: s.dimension)
        groups = sorted({key(s) for s in samples})
        accs = [sum(s.id in right for s in samples if key(s) == g) / sum(key(s) == g for s in samples) for g in groups]
        assert list(metric["groups"]) == groups and metric["score"] == pytest.approx(sum(accs) / len(accs))
    elif name == "pope":
        tp = sum(s.id in right and s.answer == "yes" for s in samples)
        fp = sum(s.id not in right and s.answer == "no" for s in samples)
        fn = sum(s.id not in right and s.answer == "yes" for s in samples)
        assert metric["precision"] == pytest.approx(tp / (tp + fp))
        assert metric["recall"] == pytest.approx(tp / (tp + fn))
        assert metric["accuracy"] == pytest.approx(len(right) / len(samples))
        assert set(metric["splits"]) == {"adversarial", "random"}
    else:  # mmvp: pairs (1, 2) and (3, 4)
        pairs = [(samples[0].id, samples[1].id), (samples[2].id, samples[3].id)]
        both = sum(a in right and b in right for a, b in pairs)
        assert metric["pairs"] == 2 and metric["score"] == pytest.approx(both / 2)


# ----------------------------------------------------------------------------- a real tiny model


def test_tiny_model_on_a_public_fixture(tmp_path):
    from zoomless.engines.hf import HFEngine
    from zoomless.models.tiny import build_tiny_vlm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples = load_benchmark("hrbench-4k", hrbench("4k")(tmp_path / "data"))
        engine = HFEngine.from_dir(build_tiny_vlm(tmp_path / "model", "qwen2_5_vl", "test"), device="cpu")
        out = tmp_path / "run"
        r = evaluate(samples, engine, views=("full",), max_pixels=112 * 112, max_new_tokens=4, batch_size=4,
                     out_dir=out, progress=False, benchmark="hrbench-4k")
    finally:
        torch.set_num_threads(threads)
    assert engine.stats["prompts"] == len(samples)  # every question reached the model
    assert all(i.error is None and i.prediction is not None for i in r.items["full"])
    res = json.loads((out / "results.json").read_text())
    assert res["views"]["full"]["accuracy"]["all"]["n"] == 4 and set(res["views"]["full"]["accuracy"]) == {
        "single", "cross", "all"}
    assert set(res["views"]["full"]["methods"]) <= {"letter", "unparsable"}
    assert (out / "summary.md").exists()


# ----------------------------------------------------------------------------- a served judge


class StubJudge:
    """An OpenAI-compatible judge on loopback: its reply depends on the response in the prompt."""

    REPLIES = {"ACME corporation": "Yes", "Zenith": "No.", "a brand": "Well, it depends on the lighting",
               "the logo": 500}

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)

    async def chat(self, request: Request):
        body = await request.json()
        self.requests.append(body)
        text = body["messages"][-1]["content"]
        text = text if isinstance(text, str) else text[-1]["text"]
        reply = self.REPLIES[text.split("The response is: ")[1].split("\n")[0]]
        if reply == 500:
            return JSONResponse({"error": {"message": "judge overloaded", "type": "server_error"}}, status_code=500)
        return {"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def test_served_judge_yes_no_garbage_and_500(tmp_path):
    samples = load_benchmark("visualprobe", visualprobe(tmp_path / "data"))
    by_id = {s.id: s for s in samples}
    assert by_id["hard/1"].answer == "Acme1" and by_id["easy/0"].answer == "40"
    answers = {  # id -> (model answer, expected method, correct)
        "easy/0": ("40", "exact", True),  # rules
        "easy/1": ("ACME corporation", "judge", True),  # judge: Yes
        "hard/0": ("41", "number", False),  # rules: a definite wrong number
        "hard/1": ("Zenith", "judge", False),  # judge: No.
        "hard/2": ("a brand", "judge_malformed", False),  # judge: neither
    }
    samples.append(Sample("hard/3", samples[0].image, "What is on the sign?", "Acme3", dimension="hard",
                          meta={"benchmark": "visualprobe", "prompt_final": True}))
    answers["hard/3"] = ("the logo", "judge_error", False)
    engine = Scripted([(s.question, answers[s.id][0]) for s in samples])
    stub = StubJudge()
    with running(stub.app) as url:
        judge = make_judge(base_url=url + "/v1", model="stub-judge", max_retries=0, timeout_s=10)
        out = tmp_path / "run"
        r = evaluate(samples, engine, views=("full",), out_dir=out, progress=False, judge=judge,
                     benchmark="visualprobe")
        judge.engine.close()
    items = {i.id: i for i in r.items["full"]}
    assert {k: (i.method, i.correct) for k, i in items.items()} == {k: (m, c) for k, (_, m, c) in answers.items()}
    assert [items[k].verdict for k in ("easy/0", "easy/1", "hard/0", "hard/1", "hard/2", "hard/3")] == [
        None, "yes", None, "no", "malformed", "error"]
    assert items["hard/2"].judge_reply == "Well, it depends on the lighting" and "500" in items["hard/3"].judge_reply
    assert len(stub.requests) == 4  # "40" and "41" were decided by the rules
    assert all(b["temperature"] == 0.0 and b["model"] == "stub-judge" for b in stub.requests)
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["judge"]["base_url"] == url + "/v1" and res["settings"]["judge"]["model"] == "stub-judge"
    assert res["views"]["full"]["judge"] == {"judged": 4, "yes": 1, "no": 1, "malformed": 1, "errors": 1, "excluded": 0}
    assert res["benchmark_metrics"]["full"]["score"] == pytest.approx((1.0 + 0.0) / 2)  # easy 2/2, hard 0/4
    summary = (out / "summary.md").read_text()
    assert f"the judge stub-judge ({url}/v1; reference prompt" in summary and "| 4 | 1 | 1 | 1 | 1 | 0 |" in summary
