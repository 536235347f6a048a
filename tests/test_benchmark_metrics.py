"""Benchmark-specific metrics (CV-Bench, VisualProbe, POPE, MMVP) against hand-computed values."""

from __future__ import annotations

import pytest

from zoomless.eval.benchmark_metrics import benchmark_metrics, group_mean, pair_accuracy, pope_scores
from zoomless.sample import Sample


def sample(bench: str, id: str, answer: str = "A", dimension: str | None = None, **meta) -> Sample:
    return Sample(id, "x.png", "q", answer, dimension=dimension, meta={"benchmark": bench, **meta})


def test_cvbench_is_the_mean_of_2d_and_3d_not_the_micro_average():
    samples = [sample("cvbench", f"2d/{i}", type="2D") for i in range(3)] + [sample("cvbench", "3d/0", type="3D")]
    m = benchmark_metrics(samples, {"2d/0": True, "2d/1": True, "2d/2": False, "3d/0": True})
    assert m["benchmark"] == "cvbench" and m["metric"] == "mean of the 2D and 3D accuracies"
    assert m["score"] == pytest.approx((2 / 3 + 1) / 2)  # micro average would be 3/4
    assert m["groups"]["2D"]["n"] == 3 and m["groups"]["2D"]["correct"] == 2 and m["groups"]["3D"]["acc"] == 1.0
    # without a "type" the id prefix the loader writes tells 2D from 3D
    bare = [s.with_(meta={"benchmark": "cvbench"}) for s in samples]
    assert benchmark_metrics(bare, {"2d/0": True, "2d/1": True, "2d/2": False, "3d/0": True})["score"] == m["score"]


def test_visualprobe_is_the_mean_over_levels():
    samples = [sample("visualprobe", f"easy/{i}", "42", "easy") for i in range(3)]
    samples += [sample("visualprobe", "hard/0", "x", "hard")]
    m = benchmark_metrics(samples, {"easy/0": True, "easy/1": True, "easy/2": True, "hard/0": False})
    assert m["score"] == pytest.approx(0.5) and set(m["groups"]) == {"easy", "hard"}


def test_pope_precision_recall_f1():
    gold = ["yes", "yes", "no", "no", "no"]
    correct = [True, False, True, False, False]  # tp 1, fn 1, tn 1, fp 2
    p = pope_scores(gold, correct)
    assert (p["tp"], p["fn"], p["tn"], p["fp"]) == (1, 1, 1, 2)
    assert p["accuracy"] == pytest.approx(2 / 5)
    assert p["precision"] == pytest.approx(1 / 3) and p["recall"] == pytest.approx(1 / 2)
    assert p["f1"] == pytest.approx(0.4) and p["yes_ratio"] == pytest.approx(3 / 5)
    # nothing predicted "yes": precision and F1 are 0, not a division error
    assert pope_scores(["yes", "no"], [False, True])["f1"] == 0.0
    with pytest.raises(ValueError, match="'maybe'"):
        pope_scores(["maybe"], [True])


def test_pope_overall_and_per_split():
    rows = [("adversarial", "yes", True), ("adversarial", "no", False), ("random", "yes", True), ("random", "no", True)]
    samples = [sample("pope", f"{split}/{i}", gold, split) for i, (split, gold, _) in enumerate(rows)]
    m = benchmark_metrics(samples, {s.id: c for s, (_, _, c) in zip(samples, rows)})
    assert m["accuracy"] == pytest.approx(3 / 4) and m["score"] == m["f1"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert m["splits"]["random"]["accuracy"] == 1.0 and m["splits"]["adversarial"]["precision"] == pytest.approx(0.5)


def test_mmvp_pairs_need_both_answers_right():
    samples = [sample("mmvp", str(i + 1), pair=i // 2) for i in range(5)]  # pairs 0, 1 and half of 2
    m = benchmark_metrics(samples, {"1": True, "2": True, "3": True, "4": False, "5": True})
    assert m["score"] == pytest.approx(1 / 2) and (m["pairs"], m["both_right"], m["incomplete_pairs"]) == (2, 1, 1)
    assert pair_accuracy([True, True], ["a", "b"])["score"] == 0.0  # no whole pair: nothing to score


def test_left_out_items_and_other_benchmarks():
    samples = [sample("cvbench", "2d/0", type="2D"), sample("cvbench", "3d/0", type="3D")]
    m = benchmark_metrics(samples, {"2d/0": True, "3d/0": None})  # the 3D item was excluded
    assert set(m["groups"]) == {"2D"} and m["score"] == 1.0
    assert benchmark_metrics([sample("vstar", "a")], {"a": True}) is None
    assert benchmark_metrics([sample("pope", "a", "yes"), sample("mmvp", "b")], {"a": True, "b": True}) is None
    assert benchmark_metrics([Sample("a", "x.png", "q", "A")], {"a": True}) is None
    assert group_mean([], [])["score"] == 0.0
