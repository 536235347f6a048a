"""The Thinking-with-Images baseline: the model may call a zoom tool, several passes per question.

    result = evaluate_tool_loop(samples, engine, max_turns=4, out_dir="runs/tool")
    speed_accuracy(single_pass_result, result)  # what a single glance must beat, and how much faster

The loop, per sample (samples of one batch advance together, one `engine.generate` per turn):
  1. system: the zoom tool described in Qwen's function-calling format; user: the full image and
     the question (`prompts.format_question`).
  2. The model answers. A `<tool_call>{"name": "zoom_in", "arguments": {"bbox_2d": [x1, y1, x2, y2]}}
     </tool_call>` (box in 0..1000 relative coordinates of the full image) is executed: the box is
     mapped to pixels of the ORIGINAL image and clamped, widened to at least 32 px per side
     (`imaging.crop_view`, no margin), the crop is enlarged to about `zoom_min_pixels` and fitted to
     `max_pixels`, and comes back as the next user turn (`<tool_response>` + the image), the form
     Qwen's chat template gives tool results. Only user/assistant/system roles are sent, so every
     engine and server (HF in-process, `zoomless serve`, vLLM) takes the conversation as is.
  3. A reply without a tool call is the final answer, graded with `grading.grade`.
  4. A malformed call (bad JSON beyond repair, unknown tool, bad box) is counted and answered with
     an error message; the model may retry or answer. The turn limit bounds everything.

Turns are model calls: `max_turns=4` allows at most 3 zooms and a final answer. Before the last
turn the model is told to answer now; a tool call in the last turn is not executed (`hit_limit`)
and what text remains around it is graded as the answer.

The zoom tool's description, the lenient parsing of calls and the zoom itself: `eval/tool_calls.py`.

`oracle_box=True`: any well-formed zoom call is executed on the sample's evidence box instead of
the model's box (for models that cannot ground). Results then measure "zooming at the right place
when asked", not grounding: reports say so.

Grading: the final answer by the rules, then, with a `judge`, the answers the rules cannot decide
are judged Yes/No, exactly as in single-pass evaluation (`eval.judge.judge_items`; the judge's
time is not part of the latency).

Latency: each turn's `generate` call is timed and shared evenly by the samples it answered (as in
single-pass evaluation); a sample's latency is the sum of its shares plus the time its zooms took.
samples/s = samples / total latency, comparable with the single-pass numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from zoomless.engines.base import Conversation, Engine, SamplingParams, conversation
from zoomless.eval.benchmark_metrics import benchmark_metrics
from zoomless.eval.grading import grade
from zoomless.eval.judge import Judge, judge_counts, judge_items, pending
from zoomless.eval.metrics import Accuracy, by_dimension, latency_stats
from zoomless.eval.runfiles import SETTINGS, check_settings, read_records
from zoomless.eval.tool_calls import parse_tool_call, strip_tool_calls, system_prompt, zoom_in
from zoomless.imaging import load_image, render_view, to_rel1000
from zoomless.prompts import FORMS, format_question
from zoomless.sample import Sample

if TYPE_CHECKING:
    from zoomless.eval.single_pass import EvalResult

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
SUMMARY = "summary.md"
KIND = "tool_loop"

# Settings that change the answers: a resumed run must match them.
_RESUME_KEYS = (
    "kind", "model", "form", "max_turns", "max_new_tokens", "max_pixels", "zoom_min_pixels", "oracle_box", "seed",
    "judge",
)

# ----------------------------------------------------------------------------- results


@dataclass
class ToolItem:
    id: str
    dimension: str | None
    prediction: str | None  # the final answer text that was graded
    parsed: str | None
    correct: bool
    method: str
    turns: int = 0  # model calls
    tool_calls: int = 0  # zooms executed
    malformed: int = 0  # tool calls that could not be executed
    hit_limit: bool = False  # the last turn still asked for a tool
    latency_s: float | None = None
    error: str | None = None
    boxes: list[list[int]] = field(default_factory=list)  # executed crop rectangles, original pixels
    trace: list[str] = field(default_factory=list)  # every model reply, in order
    verdict: str | None = None  # the judge's: "yes", "no", "malformed", "error"; None: not judged
    judge_reply: str | None = None  # its text, or the error of a failed call
    excluded: bool = False  # left out of the denominators (a malformed/failed verdict, on_malformed="skip")


@dataclass
class ToolLoopResult:
    settings: dict[str, Any]
    items: list[ToolItem]
    benchmark_metrics: dict[str, Any] | None = None  # CV-Bench, VisualProbe, POPE, MMVP only

    @property
    def dimensions(self) -> list[str]:
        return sorted({it.dimension or "other" for it in self.items})

    def scored(self) -> list[ToolItem]:
        """The items that count (all but the excluded ones)."""
        return [it for it in self.items if not it.excluded]

    def accuracy(self) -> dict[str, Accuracy]:
        items = self.scored()
        return by_dimension([it.correct for it in items], [it.dimension for it in items])

    def timing(self) -> dict[str, float]:
        return latency_stats([it.latency_s for it in self.items if it.latency_s is not None])

    def methods(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for it in self.items:
            counts[it.method] = counts.get(it.method, 0) + 1
        return counts

    def tool_stats(self) -> dict[str, Any]:
        n = len(self.items) or 1
        return {
            "oracle_box": bool(self.settings.get("oracle_box")),
            "mean_turns": sum(it.turns for it in self.items) / n,
            "mean_tool_calls": sum(it.tool_calls for it in self.items) / n,
            "samples_with_tool_call": sum(it.tool_calls > 0 for it in self.items),
            "malformed_calls": sum(it.malformed for it in self.items),
            "samples_with_malformed": sum(it.malformed > 0 for it in self.items),
            "hit_limit": sum(it.hit_limit for it in self.items),
        }

    def to_dict(self) -> dict[str, Any]:
        out = {
            "kind": KIND,
            "settings": self.settings,
            "accuracy": {d: asdict(a) for d, a in self.accuracy().items()},
            "methods": self.methods(),
            "judge": judge_counts(self.items),
            "timing": self.timing(),
            "tools": self.tool_stats(),
        }
        if self.benchmark_metrics:
            out["benchmark_metrics"] = self.benchmark_metrics
        return out


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """One sample's conversation in progress."""

    sample: Sample
    full: Image.Image | None  # the original image, where the zooms are cut from
    conv: Conversation
    item: ToolItem
    done: bool = False


def _user(parts: list[Any]) -> dict[str, Any]:
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
    ]
    return {"role": "user", "content": content}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _last_turn_note(run: _Run, max_turns: int) -> str:
    if run.item.turns != max_turns - 1:
        return ""
    return "\nThis is your last reply: give your final answer now, without calling the tool."


def _finish(run: _Run, answer: str | None, form: str, error: str | None = None) -> None:
    g = grade(run.sample, answer, form, error=error)
    it = run.item
    it.prediction, it.parsed, it.correct, it.method, it.error = answer, g.parsed, g.correct, g.method, error
    run.done = True


def _step(run: _Run, text: str, *, max_turns: int, form: str, oracle_box: bool, zoom_kw: dict[str, Any]) -> None:
    """Act on one model reply: finish with an answer, run the tool, or report a malformed call."""
    it = run.item
    it.trace.append(text)
    call = parse_tool_call(text, need_box=not oracle_box)
    if call is None:
        _finish(run, text, form)
        return
    if it.turns >= max_turns:  # no turn left to show a zoom: grade what surrounds the call
        it.hit_limit = True
        it.malformed += call.error is not None
        _finish(run, strip_tool_calls(text), form)
        return
    run.conv.append(_assistant(text))
    if call.error is not None:
        it.malformed += 1
        msg = (f"<tool_response>\nError: {call.error}. Call the tool again with valid JSON, "
               "or give your final answer.\n</tool_response>")
        run.conv.append(_user([msg + _last_turn_note(run, max_turns)]))
        return
    t0 = time.perf_counter()
    if oracle_box:
        image, rect = zoom_in(run.full, run.sample.box, relative=False, **zoom_kw)
    else:
        image, rect = zoom_in(run.full, call.bbox, **zoom_kw)
    it.latency_s = (it.latency_s or 0.0) + time.perf_counter() - t0
    it.tool_calls += 1
    it.boxes.append(list(rect))
    rel = list(to_rel1000(rect, *run.full.size))
    msg = (f"<tool_response>\nThe region {rel} of the full image, enlarged to {image.width}x{image.height} px:"
           "\n</tool_response>")
    run.conv.append(_user([image, msg + _last_turn_note(run, max_turns)]))


def _start(sample: Sample, form: str, max_turns: int, max_pixels: int | None) -> _Run:
    item = ToolItem(sample.id, sample.dimension, None, None, False, "error")
    try:
        full = load_image(sample.image, name=sample.id)
        image, text = render_view(sample, "full", image=full, max_pixels=max_pixels)
    except Exception as e:  # noqa: BLE001 - any unusable input is one failed item, never a crash
        item.error = " ".join(str(e).split()) or type(e).__name__
        return _Run(sample, None, [], item, done=True)
    conv = conversation([image], format_question(sample, text, form), system=system_prompt(max_turns))
    return _Run(sample, full, conv, item)


def _run_batch(
    batch: Sequence[Sample], engine: Engine, params: SamplingParams, *, form: str, max_turns: int,
    max_pixels: int | None, oracle_box: bool, zoom_kw: dict[str, Any],
) -> list[ToolItem]:
    runs = [_start(s, form, max_turns, max_pixels) for s in batch]
    for _ in range(max_turns):
        active = [r for r in runs if not r.done]
        if not active:
            break
        t0 = time.perf_counter()
        gens = engine.generate([r.conv for r in active], params)
        share = (time.perf_counter() - t0) / len(active)
        if len(gens) != len(active):
            raise RuntimeError(f"engine {engine.name!r} returned {len(gens)} answers for {len(active)} conversations")
        for run, g in zip(active, gens):
            gen = g[0]
            run.item.turns += 1
            run.item.latency_s = (run.item.latency_s or 0.0) + share
            if gen.error is not None or gen.finish_reason == "error":
                _finish(run, None, form, error=gen.error or "generation failed")
                continue
            _step(run, gen.text, max_turns=max_turns, form=form, oracle_box=oracle_box, zoom_kw=zoom_kw)
    return [r.item for r in runs]


# ----------------------------------------------------------------------------- resume files


def _read_done(path: Path) -> dict[str, ToolItem]:
    return {i.id: i for i in read_records(path, ToolItem, "tool-loop prediction")}


def _check_samples(samples: Sequence[Sample], oracle_box: bool) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise ValueError(f"sample id {s.id!r} appears twice; ids must be unique")
        if s.answer is None:
            raise ValueError(f"sample {s.id!r} has no gold answer to evaluate against")
        if oracle_box and s.box is None:
            raise ValueError(f"sample {s.id!r} has no evidence box, which oracle_box=True needs")
        seen.add(s.id)


# ----------------------------------------------------------------------------- entry points


def evaluate_tool_loop(
    samples: Iterable[Sample],
    engine: Engine,
    *,
    max_turns: int = 4,
    form: str = "mcq",
    max_pixels: int | None = None,
    oracle_box: bool = False,
    out_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    zoom_min_pixels: int = 512 * 512,
    benchmark: str | None = None,
    model: str | None = None,
    judge: Judge | None = None,
) -> ToolLoopResult:
    """Run the zoom-tool loop on every sample (greedy), grade the final answers (rules, then `judge`
    for what they cannot decide) and, with `out_dir`, write predictions.jsonl (resumable),
    settings.json, results.json and summary.md."""
    samples = list(samples)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_samples(samples, oracle_box)
    settings = {
        "kind": KIND,
        "model": model or getattr(engine, "name", type(engine).__name__),
        "benchmark": benchmark,
        "form": form,
        "max_turns": max_turns,
        "max_new_tokens": max_new_tokens,
        "max_pixels": max_pixels,
        "zoom_min_pixels": zoom_min_pixels,
        "oracle_box": oracle_box,
        "seed": seed,
        "decoding": "greedy",
        "batch_size": batch_size,
        "n_samples": len(samples),
        "judge": None if judge is None else judge.describe(),
    }
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    loop_kw = dict(form=form, max_turns=max_turns, max_pixels=max_pixels, oracle_box=oracle_box,
                   zoom_kw={"zoom_min_pixels": zoom_min_pixels, "max_pixels": max_pixels})

    done: dict[str, ToolItem] = {}
    pred_file = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out, settings, _RESUME_KEYS)
        done = _read_done(out / PREDICTIONS)
        pred_file = (out / PREDICTIONS).open("a")
    todo = [s for s in samples if s.id not in done]
    bar = Progress(
        TextColumn("[bold]tool loop"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress
    )

    def save(items: Sequence[ToolItem]) -> None:
        if pred_file is not None:
            pred_file.writelines(json.dumps(asdict(item)) + "\n" for item in items)
            pred_file.flush()

    try:
        if judge is not None:  # judge calls that failed in an earlier run are retried
            retry = [(s, done[s.id]) for s in samples if s.id in done and pending(s, done[s.id], form)]
            for start in range(0, len(retry), batch_size):
                pairs = retry[start : start + batch_size]
                judge_items(judge, pairs, form)
                save([it for _, it in pairs])
        with bar:
            task = bar.add_task("tool loop", total=len(samples), completed=len(samples) - len(todo))
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                answered = _run_batch(batch, engine, params, **loop_kw)
                judge_items(judge, list(zip(batch, answered)), form)  # the verdict is part of the record
                for item in answered:
                    done[item.id] = item
                save(answered)
                bar.advance(task, len(batch))
    finally:
        if pred_file is not None:
            pred_file.close()

    items = [done[s.id] for s in samples]
    special = benchmark_metrics(samples, {it.id: None if it.excluded else it.correct for it in items})
    result = ToolLoopResult(settings, items, special)
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def evaluate_tool_loop_file(
    path: str | Path, engine: Engine, out_dir: str | Path | None = None, *, limit: int | None = None, **kw: Any
) -> ToolLoopResult:
    """The CLI entry point (`zoomless eval --tool-loop`): load a benchmark file, keep the first
    `limit` samples, run `evaluate_tool_loop`; keyword arguments go to it."""
    from zoomless.eval.generic import load_benchmark

    samples = load_benchmark(path)
    if limit is not None:
        samples = samples[:limit]
    kw.setdefault("benchmark", Path(path).name)
    return evaluate_tool_loop(samples, engine, out_dir=out_dir, **kw)


def load_tool_result(out_dir: str | Path) -> ToolLoopResult:
    """A ToolLoopResult rebuilt from a tool-loop folder (settings.json + predictions.jsonl)."""
    out = Path(out_dir)
    path = out / SETTINGS
    settings = json.loads(path.read_text()) if path.exists() else {}
    if settings.get("kind") != KIND:
        raise ValueError(f"{out}: not a tool-loop evaluation folder (no {SETTINGS} with kind {KIND!r})")
    special = None  # needs the samples: read back from the results of the run that wrote them
    if (out / RESULTS).exists():
        special = json.loads((out / RESULTS).read_text()).get("benchmark_metrics")
    return ToolLoopResult(settings, list(_read_done(out / PREDICTIONS).values()), special)


# ----------------------------------------------------------------------------- speed vs accuracy


def speed_accuracy(single_pass_result: "EvalResult", tool_result: ToolLoopResult, view: str = "full") -> dict[str, Any]:
    """Accuracy and samples/s of one glance (`view` of a single-pass run) and of the tool loop,
    over the questions both answered. `speedup` = single-pass samples/s / tool-loop samples/s."""
    if view not in single_pass_result.items:
        raise ValueError(f"the single-pass result has no {view!r} view (it has {single_pass_result.views})")
    tool = {it.id: it for it in tool_result.scored()}
    single = [it for it in single_pass_result.scored(view) if it.id in tool]
    ids = {it.id for it in single}
    tools = [tool[i] for i in tool if i in ids]

    def side(correct: list[bool], latencies: list[float | None]) -> dict[str, float]:
        acc = by_dimension(correct, [None] * len(correct))["all"]
        t = latency_stats([x for x in latencies if x is not None])
        return {"accuracy": acc.acc, "lo": acc.lo, "hi": acc.hi,
                "samples_per_s": t["samples_per_s"], "mean_s": t["mean_s"]}

    sp = side([it.correct for it in single], [it.latency_s for it in single])
    tl = side([it.correct for it in tools], [it.latency_s for it in tools])
    speedup = sp["samples_per_s"] / tl["samples_per_s"] if tl["samples_per_s"] > 0 else float("nan")
    return {
        "n": len(ids),
        "view": view,
        "oracle_box": bool(tool_result.settings.get("oracle_box")),
        "single_pass": sp,
        "tool_loop": tl,
        "accuracy_delta": tl["accuracy"] - sp["accuracy"],  # tool loop - single pass
        "speedup": speedup,
    }


# ----------------------------------------------------------------------------- outputs


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def to_markdown(result: ToolLoopResult) -> str:
    """The accuracy table per dimension and the loop's statistics; an oracle run says so first."""
    from zoomless.eval.report import benchmark_metric_lines, fmt_acc, judge_line

    s, acc, t, tools = result.settings, result.accuracy(), result.timing(), result.tool_stats()
    pixels = "native" if s.get("max_pixels") is None else f"{s['max_pixels']:,}"
    lines = [
        "# Tool-loop evaluation (Thinking with Images)",
        "",
        f"model {s.get('model')}, form {s.get('form')}, max_turns {s.get('max_turns')}, max_pixels {pixels}, "
        f"seed {s.get('seed')}, greedy, max_new_tokens {s.get('max_new_tokens')}",
        "",
        judge_line(s),
        "",
    ]
    if tools["oracle_box"]:
        lines += ["**Oracle box**: zoom calls were executed on the sample's evidence box, not the model's box.", ""]
    rows = [[d, str(acc[d].n), fmt_acc(acc[d])] for d in result.dimensions + ["all"]]
    lines += [_table(["dimension", "n", "accuracy (%, 95% CI)"], rows), ""]
    lines += [
        _table(
            ["mean turns", "mean zooms", "malformed calls", "turn limit hit", "p50 s", "samples/s"],
            [[f"{tools['mean_turns']:.2f}", f"{tools['mean_tool_calls']:.2f}", str(tools["malformed_calls"]),
              str(tools["hit_limit"]), f"{t['p50_s']:.3f}", f"{t['samples_per_s']:.2f}"]],
        ),
        "",
    ]
    m = result.methods()
    grading = [["unparsable", str(m.get("unparsable", 0))], ["failed", str(m.get("error", 0))]]
    if s.get("judge"):
        j = judge_counts(result.items)
        grading += [[f"judge {k}" if k not in ("judged", "excluded") else k, str(v)] for k, v in j.items()]
    lines += [_table(["grading", "items"], grading), ""]
    if result.benchmark_metrics:
        lines += benchmark_metric_lines({"tool loop": result.benchmark_metrics}) + [""]
    return "\n".join(lines)


def write_outputs(result: ToolLoopResult, out_dir: str | Path) -> None:
    out = Path(out_dir)
    (out / RESULTS).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / SUMMARY).write_text(to_markdown(result))
