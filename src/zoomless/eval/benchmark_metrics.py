"""Headline metrics of the benchmarks whose score is not the plain accuracy, computed as the public
evaluation code computes them:

- CV-Bench: the mean of the 2D and the 3D accuracies (not the accuracy over all questions);
- VisualProbe: the mean of the Easy, Medium and Hard accuracies;
- POPE: accuracy, precision, recall and F1 with "yes" as the positive class, from correctness and
  the gold (a wrong answer to a "no" question counts as a predicted "yes"), overall and per split;
- MMVP: pair accuracy: a pair (one question on two images) scores only when both answers are right.

    benchmark_metrics(samples, {"2d/0": True, "3d/0": False})  # -> {"benchmark": "cvbench", "score": 0.5, ...}

Items left out of the denominator (`correct` None, or absent) are left out here too; an MMVP pair
with a member left out does not count. Other benchmarks have no special metric (None).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping, Sequence

from zoomless.eval.metrics import accuracy
from zoomless.sample import Sample

SPECIAL = ("cvbench", "visualprobe", "pope", "mmvp")


def group_mean(correct: Sequence[bool], groups: Sequence[str]) -> dict[str, Any]:
    """The unweighted mean of the per-group accuracies, and each group's accuracy."""
    by: dict[str, list[bool]] = {}
    for c, g in zip(correct, groups, strict=True):
        by.setdefault(g, []).append(c)
    accs = {g: accuracy(by[g]) for g in sorted(by)}
    score = sum(a.acc for a in accs.values()) / len(accs) if accs else 0.0
    return {"score": score, "groups": {g: asdict(a) for g, a in accs.items()}}


def pope_scores(gold: Sequence[str], correct: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, precision, recall and F1 ("yes" positive) and the share of predicted "yes"."""
    tp = fp = tn = fn = 0
    for g, c in zip(gold, correct, strict=True):
        if g not in ("yes", "no"):
            raise ValueError(f"POPE gold must be 'yes' or 'no', got {g!r}")
        if g == "yes":
            tp, fn = tp + c, fn + (not c)
        else:
            tn, fp = tn + c, fp + (not c)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n, "accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def pair_accuracy(correct: Sequence[bool], pairs: Sequence[Any]) -> dict[str, Any]:
    """The share of pairs whose two questions are both right; a group that is not a whole pair
    (one member, cut off by a limit or left out) does not count."""
    by: dict[Any, list[bool]] = {}
    for c, p in zip(correct, pairs, strict=True):
        by.setdefault(p, []).append(c)
    whole = [flags for flags in by.values() if len(flags) == 2]
    both = sum(all(flags) for flags in whole)
    return {"score": both / len(whole) if whole else 0.0, "pairs": len(whole), "both_right": both,
            "incomplete_pairs": len(by) - len(whole)}


def benchmark_of(samples: Sequence[Sample]) -> str | None:
    """The public benchmark every sample comes from (meta["benchmark"], set by the loaders)."""
    names = {s.meta.get("benchmark") for s in samples}
    return names.pop() if len(names) == 1 else None


def _cv_type(s: Sample) -> str:
    kind = s.meta.get("type") or (s.id.split("/", 1)[0] if "/" in s.id else "unknown")
    return str(kind).upper()


def benchmark_metrics(samples: Sequence[Sample], correct: Mapping[str, bool | None]) -> dict[str, Any] | None:
    """The benchmark's special metric over the scored samples (`correct` by sample id; None or
    absent: left out), or None when the samples are not from CV-Bench, VisualProbe, POPE or MMVP."""
    bench = benchmark_of(samples)
    if bench not in SPECIAL:
        return None
    scored = [s for s in samples if correct.get(s.id) is not None]
    flags = [bool(correct[s.id]) for s in scored]
    if bench == "cvbench":
        out = {"metric": "mean of the 2D and 3D accuracies", **group_mean(flags, [_cv_type(s) for s in scored])}
    elif bench == "visualprobe":
        out = {"metric": "mean of the per-level accuracies",
               **group_mean(flags, [s.dimension or "unknown" for s in scored])}
    elif bench == "pope":
        gold = [(s.answer or "").lower() for s in scored]
        overall = pope_scores(gold, flags)
        splits: dict[str, list[int]] = {}
        for i, s in enumerate(scored):
            splits.setdefault(s.dimension or "all", []).append(i)
        per_split = {k: pope_scores([gold[i] for i in ix], [flags[i] for i in ix]) for k, ix in sorted(splits.items())}
        out = {"metric": "F1 (positive class yes)", "score": overall["f1"], **overall, "splits": per_split}
    else:  # mmvp
        out = {"metric": "pair accuracy (both questions of a pair right)",
               **pair_accuracy(flags, [s.meta.get("pair", s.id) for s in scored])}
    return {"benchmark": bench, **out}
