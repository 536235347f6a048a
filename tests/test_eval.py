"""Single-pass dual-view evaluation: metrics, resumability, failures, reports, generic loader, e2e."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from zoomless.engines.base import Generation, SamplingParams
from zoomless.eval.generic import load_benchmark, load_generic
from zoomless.eval.metrics import latency_stats, paired_gap, percentile, wilson
from zoomless.eval.report import (
    compare_markdown, compare_table, dual_view_table, gap_chart, gap_change_chart, to_markdown,
)
from zoomless.eval.single_pass import PREDICTIONS, EvalResult, ItemResult, evaluate, load_result
from zoomless.sample import Sample, SampleError

# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "k,n,lo,hi",  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score, no correction)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_known_values(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_edges():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73


def test_paired_gap_on_synthetic_results():
    # 10 questions: crop fixes 4, breaks 1, agrees on 5
    full = {str(i): c for i, c in enumerate([0, 0, 0, 0, 1, 1, 1, 0, 1, 0])}
    crop = {str(i): c for i, c in enumerate([1, 1, 1, 1, 0, 1, 1, 0, 1, 0])}
    g = paired_gap({k: bool(v) for k, v in full.items()}, {k: bool(v) for k, v in crop.items()})
    d = np.array([crop[k] - full[k] for k in full], dtype=float)
    assert g.gap == pytest.approx(d.mean()) == pytest.approx(0.3)
    half = 1.959963984540054 * d.std(ddof=1) / math.sqrt(len(d))
    assert (g.lo, g.hi) == pytest.approx((0.3 - half, 0.3 + half))
    assert g.n == 10
    # pairing only uses ids answered in both views
    assert paired_gap({"a": True, "b": False}, {"a": True}).n == 1


def test_latency_percentiles_match_numpy():
    xs = [random.Random(0).random() for _ in range(37)]
    for q in (50, 90, 99):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    stats = latency_stats([0.5, 0.5, 1.0, 2.0])
    assert stats["samples_per_s"] == pytest.approx(4 / 4.0)
    assert stats["p50_s"] == pytest.approx(0.75)


# ----------------------------------------------------------------------------- fixtures

COLOURS = ["red", "blue", "green", "yellow"]


class DictEngine:
    """A real Engine that answers each question from a dict (keyed by the sample's question and
    the view, told apart by image size), records every question asked, and can fail on a call."""

    name = "dict-engine"

    def __init__(self, answers: dict[tuple[str, str], str], fail_on_call: int | None = None):
        self.answers = answers
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.asked: list[tuple[str, tuple[int, int]]] = []

    def generate(self, conversations, params: SamplingParams):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("engine died")
        assert params.temperature == 0.0 and params.seed == 0
        out = []
        for conv in conversations:
            content = conv[-1]["content"]
            image = content[0]["image"]
            question = content[1]["text"].split("\n")[0]
            self.asked.append((question, image.size))
            view = "full" if image.size == (64, 64) else "crop"
            out.append([Generation(text=self.answers.get((question, view), "no idea"))])
        return out


def make_set(tmp_path: Path, n: int = 12) -> tuple[list[Sample], dict[tuple[str, str], str]]:
    """n MCQ/open samples on 64x64 images; the engine's answers are right on crops, half right on full."""
    samples, answers = [], {}
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (64, 64), (i * 20 % 255, 80, 160)).save(path)
        q = f"Question {i}: what colour is it?"
        gold = COLOURS[i % 4]
        opts = tuple(COLOURS) if i % 3 else None  # some open questions
        dim = ["color", "counting", "ocr"][i % 3]
        samples.append(Sample(f"s{i}", str(path), q, gold, opts, (8, 8, 40, 40), dim))
        answers[(q, "crop")] = gold
        answers[(q, "full")] = gold if i % 2 else COLOURS[(i + 1) % 4]
    return samples, answers


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_scores_views_and_gap(tmp_path):
    samples, answers = make_set(tmp_path)
    engine = DictEngine(answers)
    r = evaluate(samples, engine, batch_size=5, out_dir=tmp_path / "run", progress=False)
    assert r.accuracy("crop")["all"].acc == 1.0
    assert r.accuracy("full")["all"].acc == 0.5
    gap = r.gap()
    assert gap["all"].gap == pytest.approx(0.5)
    for d in r.dimensions:
        assert gap[d].gap == pytest.approx(r.accuracy("crop")[d].acc - r.accuracy("full")[d].acc)
    assert engine.calls == 2 * math.ceil(12 / 5)  # batches per view
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["gap"]["all"]["gap"] == pytest.approx(0.5)
    assert res["settings"]["model"] == "dict-engine" and res["settings"]["max_pixels"] is None
    assert res["views"]["full"]["accuracy"]["color"]["n"] == 4
    assert res["views"]["crop"]["timing"]["n"] == 12
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "| all | 12 |" in summary and "+50.0" in summary


def test_resume_after_crash_asks_nothing_twice_and_matches_clean_run(tmp_path):
    samples, answers = make_set(tmp_path, n=14)
    clean = evaluate(samples, DictEngine(answers), batch_size=4, out_dir=tmp_path / "clean", progress=False)

    out = tmp_path / "resumed"
    first = DictEngine(answers, fail_on_call=6)  # dies on the 2nd crop batch: full (4+4+4+2) and 4 crops saved
    with pytest.raises(RuntimeError, match="engine died"):
        evaluate(samples, first, batch_size=4, out_dir=out, progress=False)
    saved = (out / PREDICTIONS).read_text().splitlines()
    assert len(saved) == 14 + 4
    with (out / PREDICTIONS).open("a") as f:
        f.write('{"view": "crop", "id": "s1')  # a torn last line from the crash

    second = DictEngine(answers)
    resumed = evaluate(samples, second, batch_size=4, out_dir=out, progress=False)
    asked = [(q, size) for q, size in first.asked[:18] + second.asked]
    assert len(asked) == len(set(asked)) == 2 * len(samples)  # every (view, id) exactly once
    lines = [json.loads(x) for x in (out / PREDICTIONS).read_text().splitlines()]
    assert len({(x["view"], x["id"]) for x in lines}) == len(lines) == 28
    for v in ("full", "crop"):
        assert [(i.id, i.prediction, i.correct) for i in resumed.items[v]] == [
            (i.id, i.prediction, i.correct) for i in clean.items[v]
        ]
        assert resumed.accuracy(v) == clean.accuracy(v)
    assert resumed.gap() == clean.gap()
    # a finished folder answers from disk alone
    third = DictEngine(answers)
    evaluate(samples, third, batch_size=4, out_dir=out, progress=False)
    assert third.calls == 0
    assert load_result(out).accuracy("crop") == clean.accuracy("crop")


def test_resume_refuses_other_settings(tmp_path):
    samples, answers = make_set(tmp_path, n=2)
    evaluate(samples, DictEngine(answers), out_dir=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="max_pixels"):
        evaluate(samples, DictEngine(answers), out_dir=tmp_path / "r", max_pixels=112 * 112, progress=False)


def test_unreadable_images_are_failed_items_in_the_denominator(tmp_path):
    samples, answers = make_set(tmp_path, n=4)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    samples[1] = samples[1].with_(image=str(tmp_path / "broken.png"))
    samples[2] = samples[2].with_(image=str(tmp_path / "missing.png"))
    samples[3] = samples[3].with_(box=None)  # no box and no teacher image: no crop view
    r = evaluate(samples, DictEngine(answers), out_dir=tmp_path / "r", progress=False)
    full, crop = r.items["full"], r.items["crop"]
    graded_by = ["letter" if s.options else "exact" for s in samples]
    assert [i.method for i in full] == [graded_by[0], "error", "error", graded_by[3]]
    assert "not a recognised image" in full[1].error and "no such file" in full[2].error
    assert "needs a box" in crop[3].error and crop[3].latency_s is None
    assert r.accuracy("crop")["all"].n == 4 and r.accuracy("crop")["all"].correct == 1
    assert r.methods("full")["error"] == 2


def test_crop_view_without_box_uses_the_teacher_image(tmp_path):
    samples, answers = make_set(tmp_path, n=2)
    Image.new("RGB", (20, 30), "white").save(tmp_path / "teacher.png")
    samples = [s.with_(box=None, teacher_image=str(tmp_path / "teacher.png")) for s in samples]
    engine = DictEngine(answers)
    r = evaluate(samples, engine, progress=False)
    assert [size for _, size in engine.asked] == [(64, 64)] * 2 + [(20, 30)] * 2
    assert r.accuracy("crop")["all"].acc == 1.0


def test_evaluate_rejects_duplicate_ids_and_missing_gold(tmp_path):
    samples, answers = make_set(tmp_path, n=2)
    with pytest.raises(ValueError, match="twice"):
        evaluate([samples[0], samples[0]], DictEngine(answers), progress=False)
    with pytest.raises(ValueError, match="no gold"):
        evaluate([samples[0].with_(answer=None, options=None)], DictEngine(answers), progress=False)


# ----------------------------------------------------------------------------- reports


def _result(full: list[bool], crop: list[bool], dims: list[str]) -> EvalResult:
    def items(view, flags):
        return [ItemResult(view, str(i), d, "x", None, c, "letter", 0.1) for i, (c, d) in enumerate(zip(flags, dims))]

    return EvalResult({"model": "m", "form": "mcq", "seed": 0, "max_pixels": 12544}, {
        "full": items("full", full), "crop": items("crop", crop)})


def test_reports(tmp_path):
    before = _result([True, False, False, False], [True, True, True, False], ["ocr", "ocr", "color", "color"])
    after = _result([True, True, True, False], [True, True, True, False], ["ocr", "ocr", "color", "color"])
    console = Console(record=True, width=160)
    console.print(dual_view_table(before))
    text = console.export_text()
    for needle in ("color", "ocr", "all", "25.0", "75.0", "+50.0", "12,544"):
        assert needle in text
    md = to_markdown(before)
    assert "| dimension | n | full acc | crop acc | gap (crop - full) |" in md
    assert "| color | 2 | 0.0 [0.0, 65.8] | 50.0 [9.5, 90.5] | +50.0" in md
    console.print(compare_table(before, after))
    assert "25.0 → 75.0 (+50.0)" in console.export_text()
    assert "+50.0 → +0.0" in compare_markdown(before, after)
    png = gap_chart(before, tmp_path / "charts" / "gap.png")
    with Image.open(png) as im:
        assert im.width > 300 and im.height > 300
    png = gap_change_chart(before, after, tmp_path / "charts" / "change.png")
    with Image.open(png) as im:
        assert im.width > 300 and im.height > 300


# ----------------------------------------------------------------------------- generic loader


def test_generic_json_and_jsonl(tmp_path):
    rows = [
        {"images": ["img/a.png"], "query": "<image>What colour?\n(A) red\n(B) blue", "response": "B",
         "crop_images": ["img/a_crop.png"], "question_type": "color"},
        {"images": ["img/b.png"], "prompt": "How many?", "answer": 3, "bbox": [1.2, 2, 30, 40.6], "id": "b"},
    ]
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    (tmp_path / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("bench.json", "bench.jsonl"):
        a, b = load_generic(tmp_path / name)
        assert a.id == "0" and a.image == str(tmp_path / "img/a.png")
        assert a.teacher_image == str(tmp_path / "img/a_crop.png")
        assert a.question.startswith("What colour?") and a.answer == "B" and a.dimension == "color"
        assert b.id == "b" and b.box == (1, 2, 30, 41) and b.answer == "3" and b.teacher_image is None
        assert [s.id for s in load_benchmark(tmp_path / name)] == ["0", "b"]


@pytest.mark.parametrize(
    "row,field",
    [
        ({"query": "q", "response": "A"}, "'images'"),
        ({"images": "a.png", "response": "A"}, "'query'"),
        ({"images": ["a.png"], "query": "q"}, "'response'"),
        ({"images": [3], "query": "q", "response": "A"}, "'images'"),
        ({"images": ["a.png"], "query": "q", "response": "A", "bbox": [1, 2, 3]}, "'bbox'"),
        ({"images": ["a.png"], "query": "q", "response": "A", "bbox": [5, 5, 1, 1]}, "'box'"),
    ],
)
def test_generic_bad_rows_name_file_row_and_field(tmp_path, row, field):
    good = {"images": ["a.png"], "query": "q", "response": "A"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, good | {"id": "x"}, row]))
    with pytest.raises(SampleError) as e:
        load_generic(path)
    assert str(path) in str(e.value) and "row 2" in str(e.value) and field in str(e.value)


def test_load_benchmark_reads_sample_records(tmp_path):
    from zoomless.sample import write_jsonl

    samples, _ = make_set(tmp_path, n=3)
    path = write_jsonl(samples, tmp_path / "set.jsonl")
    assert [s.id for s in load_benchmark(path)] == ["s0", "s1", "s2"]


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_tiny_model_on_zoomworld(tmp_path):
    from zoomless.engines.hf import HFEngine
    from zoomless.models.tiny import build_tiny_vlm
    from zoomless.world import generate_split

    data = generate_split(tmp_path / "world", "test", 6, seed=0, progress=False)
    samples = load_benchmark(data)
    engine = HFEngine.from_dir(build_tiny_vlm(tmp_path / "model", "qwen2_5_vl", "test"))
    out = tmp_path / "eval"
    r = evaluate(samples, engine, max_pixels=112 * 112, max_new_tokens=4, batch_size=6, out_dir=out, progress=False)
    assert (out / "results.json").exists() and (out / "summary.md").exists()
    res = json.loads((out / "results.json").read_text())
    for v in ("full", "crop"):
        acc = res["views"][v]["accuracy"]["all"]
        assert acc["n"] == 6 and 0.0 <= acc["acc"] <= 1.0
        assert res["views"][v]["timing"]["samples_per_s"] > 0
    full, crop = res["views"]["full"]["accuracy"]["all"]["acc"], res["views"]["crop"]["accuracy"]["all"]["acc"]
    assert res["gap"]["all"]["gap"] == pytest.approx(crop - full)
    assert res["settings"]["max_pixels"] == 112 * 112
    assert all(i.error is None for v in r.views for i in r.items[v])  # everything reached the model


def test_the_crop_view_is_the_datas_own_crop_when_it_ships_one() -> None:
    from zoomless.eval.single_pass import view_for
    from zoomless.sample import Sample

    boxed = Sample(id="a", image="x.png", question="q?", box=(0, 0, 10, 10))
    shipped = boxed.with_(teacher_image="crop.png")  # ZoomBench: a bbox and its own crop column
    assert view_for(boxed, "crop") == "crop"
    assert view_for(shipped, "crop") == "teacher"
    assert view_for(shipped, "full") == "full"
