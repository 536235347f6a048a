"""Single-pass, dual-view evaluation: every question asked once per view, greedy, one glance.

    result = evaluate(samples, engine, views=("full", "crop"), out_dir="runs/eval")

For each view, samples are rendered (`imaging.render_view`), batched into conversations, answered
by `engine.generate` and graded by rules (`grading.grade`). A sample whose image cannot be loaded
or whose generation failed is a wrong item with its error recorded: it stays in the denominator.

With a `judge` (`eval.judge.make_judge`), the answers the rules cannot decide (an open answer that
fails the string and number match, an answer where no option letter can be read) are judged Yes/No;
rule-decided items never reach it. Each item records its grading source in `method` ("letter",
"exact", "number", "unparsable", "error", "judge", "judge_malformed", "judge_error"), the verdict
and the judge's reply. A malformed or failed verdict is wrong, or with the judge's
on_malformed="skip" `excluded` from every denominator; both are counted in the summary. A rerun in
the same folder retries the failed judge calls (the answers are kept).

With `out_dir`, every graded item is appended to `predictions.jsonl` as soon as its batch is done;
a rerun skips the (view, id) pairs already there, so a crash or Ctrl-C loses at most one batch.
At the end `results.json` (machine-readable) and `summary.md` (the table) are written.

Latency: each batch's `generate` call is timed; every item of the batch gets batch time / batch
size (the model's cost per question, rendering excluded). samples/s = items / generation time.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from zoomless.engines.base import Engine, SamplingParams, conversation
from zoomless.eval.benchmark_metrics import benchmark_metrics
from zoomless.eval.grading import grade
from zoomless.eval.judge import Judge, judge_counts, judge_items, pending
from zoomless.eval.metrics import Accuracy, Gap, by_dimension, gap_by_dimension, latency_stats
from zoomless.imaging import render_view
from zoomless.prompts import FORMS, format_question
from zoomless.eval.runfiles import SETTINGS, check_settings, read_records
from zoomless.sample import Sample

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
SUMMARY = "summary.md"

# Settings that change the answers: a resumed run must match them.
_RESUME_KEYS = ("model", "form", "max_new_tokens", "max_pixels", "crop_margin", "zoom", "seed", "judge")


@dataclass
class ItemResult:
    view: str
    id: str
    dimension: str | None
    prediction: str | None
    parsed: str | None
    correct: bool
    method: str
    latency_s: float | None = None  # None for items that never reached the model
    error: str | None = None
    verdict: str | None = None  # the judge's: "yes", "no", "malformed", "error"; None: not judged
    judge_reply: str | None = None  # its text, or the error of a failed call
    excluded: bool = False  # left out of the denominators (a malformed/failed verdict, on_malformed="skip")


@dataclass
class EvalResult:
    settings: dict[str, Any]
    items: dict[str, list[ItemResult]] = field(default_factory=dict)  # view -> items, sample order
    benchmark_metrics: dict[str, Any] = field(default_factory=dict)  # view -> `benchmark_metrics` (when special)

    @property
    def views(self) -> list[str]:
        return list(self.items)

    @property
    def dimensions(self) -> list[str]:
        """The dimensions present, sorted ("other" for samples without one)."""
        return sorted({it.dimension or "other" for items in self.items.values() for it in items})

    def scored(self, view: str) -> list[ItemResult]:
        """The items of a view that count (all but the excluded ones)."""
        return [it for it in self.items[view] if not it.excluded]

    def accuracy(self, view: str) -> dict[str, Accuracy]:
        """Accuracy per dimension plus "all" for one view."""
        items = self.scored(view)
        return by_dimension([it.correct for it in items], [it.dimension for it in items])

    def gap(self, full: str = "full", crop: str = "crop") -> dict[str, Gap] | None:
        """The zooming gap Acc(crop) - Acc(full), paired per question, per dimension plus "all"."""
        if full not in self.items or crop not in self.items:
            return None
        f = {it.id: it.correct for it in self.scored(full)}
        c = {it.id: it.correct for it in self.scored(crop)}
        dims = {it.id: it.dimension for it in self.items[full]}
        return gap_by_dimension(f, c, dims)

    def timing(self, view: str) -> dict[str, float]:
        lat = [it.latency_s for it in self.items[view] if it.latency_s is not None]
        return latency_stats(lat)

    def methods(self, view: str) -> dict[str, int]:
        """How many items each grading method decided (how many were unparsable or failed)."""
        counts: dict[str, int] = {}
        for it in self.items[view]:
            counts[it.method] = counts.get(it.method, 0) + 1
        return counts

    def judge_counts(self, view: str) -> dict[str, int]:
        """Items judged, verdicts, and items excluded from the denominator."""
        return judge_counts(self.items[view])

    def to_dict(self) -> dict[str, Any]:
        gap = self.gap()
        out = {
            "settings": self.settings,
            "views": {
                v: {
                    "accuracy": {d: asdict(a) for d, a in self.accuracy(v).items()},
                    "methods": self.methods(v),
                    "judge": self.judge_counts(v),
                    "timing": self.timing(v),
                }
                for v in self.views
            },
            "gap": None if gap is None else {d: asdict(g) for d, g in gap.items()},
        }
        if self.benchmark_metrics:
            out["benchmark_metrics"] = self.benchmark_metrics
        return out


# ----------------------------------------------------------------------------- resume files


def _read_done(path: Path) -> dict[tuple[str, str], ItemResult]:
    """Items already graded, by (view, id)."""
    return {(i.view, i.id): i for i in read_records(path, ItemResult, "prediction")}


# ----------------------------------------------------------------------------- evaluation


def view_for(sample: Sample, view: str) -> str:
    """The view actually rendered: when the data ships its own crop (ZoomBench's crop column, a
    Vision-OPD teacher image), the crop view is that image, as the benchmark defines its dual view;
    otherwise the crop is cut from the evidence box."""
    if view == "crop" and sample.teacher_image is not None:
        return "teacher"
    return view


def _check_samples(samples: Sequence[Sample]) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise ValueError(f"sample id {s.id!r} appears twice; ids must be unique")
        if s.answer is None:
            raise ValueError(f"sample {s.id!r} has no gold answer to evaluate against")
        seen.add(s.id)


def _answer_batch(
    batch: Sequence[Sample],
    view: str,
    engine: Engine,
    params: SamplingParams,
    form: str,
    render_kw: dict[str, Any],
) -> list[ItemResult]:
    """Render, generate and grade one batch; rendering failures become failed items."""
    out: dict[int, ItemResult] = {}
    convs, asked = [], []
    for i, s in enumerate(batch):
        try:
            image, text = render_view(s, view_for(s, view), **render_kw)
        except Exception as e:  # noqa: BLE001 - any unusable input is one failed item, never a crash
            msg = " ".join(str(e).split()) or type(e).__name__
            out[i] = ItemResult(view, s.id, s.dimension, None, None, False, "error", None, msg)
            continue
        convs.append(conversation([image], format_question(s, text, form)))
        asked.append(i)
    if convs:
        t0 = time.perf_counter()
        gens = engine.generate(convs, params)
        per_item = (time.perf_counter() - t0) / len(convs)
        if len(gens) != len(convs):
            raise RuntimeError(f"engine {engine.name!r} returned {len(gens)} answers for {len(convs)} questions")
        for i, g in zip(asked, gens):
            s, gen = batch[i], g[0]
            gr = grade(s, gen.text, form, error=gen.error)
            out[i] = ItemResult(
                view, s.id, s.dimension, gen.text, gr.parsed, gr.correct, gr.method, per_item, gen.error
            )
    return [out[i] for i in range(len(batch))]


def evaluate(
    samples: Iterable[Sample],
    engine: Engine,
    *,
    views: Sequence[str] = ("full", "crop"),
    form: str = "mcq",
    max_new_tokens: int = 16,
    max_pixels: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    crop_margin: float = 0.25,
    zoom: float = 2.0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    benchmark: str | None = None,
    model: str | None = None,
    judge: Judge | None = None,
) -> EvalResult:
    """Ask every sample in every view, grade (rules, then `judge` for what they cannot decide), and
    (with `out_dir`) write predictions, results and summary, resuming from earlier predictions in
    that folder. `benchmark` and `model` are labels for reports (`model` defaults to the engine's
    name)."""
    samples = list(samples)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_samples(samples)
    settings = {
        "model": model or getattr(engine, "name", type(engine).__name__),
        "benchmark": benchmark,
        "form": form,
        "views": list(views),
        "max_new_tokens": max_new_tokens,
        "max_pixels": max_pixels,
        "crop_margin": crop_margin,
        "zoom": zoom,
        "seed": seed,
        "decoding": "greedy",
        "batch_size": batch_size,
        "n_samples": len(samples),
        "judge": None if judge is None else judge.describe(),
    }
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    render_kw = {"crop_margin": crop_margin, "zoom": zoom, "max_pixels": max_pixels}

    done: dict[tuple[str, str], ItemResult] = {}
    pred_file = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out, settings, _RESUME_KEYS)
        done = _read_done(out / PREDICTIONS)
        pred_file = (out / PREDICTIONS).open("a")

    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress,
    )

    def save(items: Sequence[ItemResult]) -> None:
        if pred_file is not None:
            pred_file.writelines(json.dumps(asdict(item)) + "\n" for item in items)
            pred_file.flush()

    try:
        with bar:
            for view in views:
                if judge is not None:  # judge calls that failed in an earlier run are retried
                    retry = [(s, done[(view, s.id)]) for s in samples
                             if (view, s.id) in done and pending(s, done[(view, s.id)], form)]
                    for start in range(0, len(retry), batch_size):
                        pairs = retry[start : start + batch_size]
                        judge_items(judge, pairs, form)
                        save([it for _, it in pairs])
                todo = [s for s in samples if (view, s.id) not in done]
                task = bar.add_task(f"{view:>8}", total=len(samples), completed=len(samples) - len(todo))
                for start in range(0, len(todo), batch_size):
                    batch = todo[start : start + batch_size]
                    answered = _answer_batch(batch, view, engine, params, form, render_kw)
                    judge_items(judge, list(zip(batch, answered)), form)  # the verdict is part of the record
                    for item in answered:
                        done[(view, item.id)] = item
                    save(answered)
                    bar.advance(task, len(batch))
    finally:
        if pred_file is not None:
            pred_file.close()

    items = {v: [done[(v, s.id)] for s in samples] for v in views}
    special = {}
    for v in views:
        m = benchmark_metrics(samples, {it.id: None if it.excluded else it.correct for it in items[v]})
        if m is not None:
            special[v] = m
    result = EvalResult(settings, items, special)
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def write_outputs(result: EvalResult, out_dir: str | Path) -> None:
    """results.json and summary.md."""
    from zoomless.eval.report import to_markdown  # report imports nothing from here at run time

    out = Path(out_dir)
    (out / RESULTS).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / SUMMARY).write_text(to_markdown(result))


def load_result(out_dir: str | Path) -> EvalResult:
    """An EvalResult rebuilt from an evaluation folder (settings.json + predictions.jsonl), in
    file order; used to compare runs made earlier."""
    out = Path(out_dir)
    if not (out / SETTINGS).exists():
        raise ValueError(f"{out}: no {SETTINGS}; not an evaluation folder")
    settings = json.loads((out / SETTINGS).read_text())
    items: dict[str, list[ItemResult]] = {}
    for item in _read_done(out / PREDICTIONS).values():
        items.setdefault(item.view, []).append(item)
    special = {}  # needs the samples: read back from the results of the run that wrote them
    if (out / RESULTS).exists():
        special = json.loads((out / RESULTS).read_text()).get("benchmark_metrics", {})
    return EvalResult(settings, items, special)


def evaluate_file(
    path: str | Path, engine: Engine, out_dir: str | Path | None = None, *, limit: int | None = None, **kw: Any
) -> EvalResult:
    """The CLI entry point: load a benchmark file (sample JSONL/parquet or the generic JSON form),
    keep the first `limit` samples, and `evaluate` them; keyword arguments go to `evaluate`."""
    from zoomless.eval.generic import load_benchmark

    samples = load_benchmark(path)
    if limit is not None:
        samples = samples[:limit]
    kw.setdefault("benchmark", Path(path).name)
    return evaluate(samples, engine, out_dir=out_dir, **kw)
