"""The combined report: single-pass, tool-loop and coverage folders into report.md, report.json and charts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from zoomless.engines.base import Generation
from zoomless.eval.coverage import coverage
from zoomless.eval.report_runs import COVERAGE_CHART, DPI, SPEED_CHART, build_report, load_run
from zoomless.eval.single_pass import evaluate
from zoomless.eval.tool_loop import evaluate_tool_loop
from zoomless.sample import Sample


class Answers:
    """A deterministic engine: single-pass views answered from the image size, tool loop scripted."""

    name = "answers"

    def generate(self, conversations, params):
        out = []
        for conv in conversations:
            image = conv[-1]["content"][0].get("image") if conv[-1]["role"] == "user" else None
            turn = sum(m["role"] == "assistant" for m in conv)
            if conv[0]["role"] == "system":  # the tool loop: zoom once, then answer A
                text = '<tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [0, 0, 500, 500]}}</tool_call>' if turn == 0 else "A"
            else:  # the crop is small: right on the crop, wrong on the full image
                text = "A" if image is not None and image.width < 100 else "B"
            out.append([Generation(text=text)])
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    samples = []
    for i in range(4):
        path = tmp / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (84, 112, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(f"s{i}", str(path), "What colour?", "red", ("red", "blue"), (28, 28, 56, 56),
                              "colour" if i % 2 else "count"))
    engine = Answers()
    evaluate(samples, engine, views=("full", "crop"), out_dir=tmp / "single", progress=False)
    evaluate_tool_loop(samples, engine, out_dir=tmp / "tool", progress=False, max_new_tokens=8, zoom_min_pixels=1)
    evaluate_tool_loop(samples[:2], engine, out_dir=tmp / "oracle", oracle_box=True, progress=False, max_new_tokens=8,
                       zoom_min_pixels=1)

    from zoomless.models.loading import load_vlm
    from zoomless.models.tiny import build_tiny_vlm

    model, processor = load_vlm(build_tiny_vlm(tmp / "tiny", size="test"), device="cpu")
    coverage(samples[:3], model, processor, out_dir=tmp / "cov", heatmaps=1, progress=False, model_name="tiny")
    return tmp


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # a valid PNG, not just a file
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_report_from_all_kinds_of_runs(runs, tmp_path):
    dirs = [runs / "single", runs / "tool", runs / "oracle", runs / "cov"]
    path = build_report(dirs, tmp_path / "report")
    out = tmp_path / "report"
    assert path == out / "report.md"
    md = path.read_text()
    for needle in ("## Dual view", "## Tool loop", "## Speed vs accuracy", "## Attention coverage",
                   "oracle box", "![coverage](coverage.png)", "![speed vs accuracy](speed_accuracy.png)"):
        assert needle in md, needle

    report = json.loads((out / "report.json").read_text())
    assert [r["kind"] for r in report["runs"]] == ["single_pass", "tool_loop", "tool_loop", "coverage"]
    pairs = {p["tool_run"]: p for p in report["speed_accuracy"]}
    assert set(pairs) == {"tool", "oracle"} and pairs["tool"]["n"] == 4 and pairs["oracle"]["n"] == 2
    assert pairs["tool"]["single_pass"]["accuracy"] == 0.0 and pairs["tool"]["tool_loop"]["accuracy"] == 1.0
    assert pairs["oracle"]["oracle_box"] is True
    cov = report["runs"][3]["summary"]
    assert cov["share"]["n"] == 3 and set(cov["by_dimension"]) == {"colour", "count"}

    # charts: valid PNGs of the sizes their figures ask for
    assert sorted(report["charts"]) == sorted(["accuracy_single.png", SPEED_CHART, COVERAGE_CHART])
    n_bars = 3  # two dimensions + "all"
    assert png_size(out / "accuracy_single.png") == (round((1.3 * n_bars + 2) * DPI), 4 * DPI)
    assert png_size(out / SPEED_CHART) == (6 * DPI, round(4.5 * DPI))
    assert png_size(out / COVERAGE_CHART) == (10 * DPI, 4 * DPI)
    assert len(list((runs / "cov" / "heatmaps").glob("*.png"))) == 1


def test_report_of_coverage_only_and_bad_folders(runs, tmp_path):
    path = build_report([runs / "cov"], tmp_path / "only")
    assert "## Attention coverage" in path.read_text() and "## Speed" not in path.read_text()
    assert not (tmp_path / "only" / SPEED_CHART).exists()
    assert load_run(runs / "tool").kind == "tool_loop"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not a run folder"):
        build_report([tmp_path / "empty"], tmp_path / "x")
    with pytest.raises(ValueError, match="no run folders"):
        build_report([], tmp_path / "x")
