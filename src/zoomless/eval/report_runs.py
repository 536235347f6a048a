"""One report from several run folders: dual-view single pass, tool loop and attention coverage.

    build_report(["runs/eval", "runs/tool", "runs/coverage"], "runs/report")  # -> runs/report/report.md

Each folder is recognised by its settings.json (`kind` "tool_loop" or "coverage"; a single-pass
folder has `views`). The report holds:
- report.md: the runs, each run's tables, speed vs accuracy of every (tool loop, single pass) pair
  over the questions both answered, coverage statistics overall and per dimension;
- report.json: the same numbers, machine-readable;
- charts: accuracy_<run>.png (full vs crop per dimension, `report.gap_chart`), speed_accuracy.png
  (samples/s vs accuracy, single pass full view and tool loops), coverage.png (histograms of the
  box share and of the relative coverage).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from zoomless.eval.coverage import CoverageResult, load_coverage
from zoomless.eval.report import gap_chart, to_markdown
from zoomless.eval.single_pass import EvalResult, load_result
from zoomless.eval.tool_loop import ToolLoopResult, load_tool_result, speed_accuracy
from zoomless.eval.tool_loop import to_markdown as tool_markdown

SPEED_CHART = "speed_accuracy.png"
COVERAGE_CHART = "coverage.png"
DPI = 120


@dataclass
class Run:
    name: str
    path: Path
    kind: str  # "single_pass", "tool_loop" or "coverage"
    result: EvalResult | ToolLoopResult | CoverageResult


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Recognise and load one run folder."""
    path = Path(path)
    settings_file = path / "settings.json"
    if not settings_file.is_file():
        raise ValueError(f"{path}: not a run folder (no settings.json)")
    try:
        settings = json.loads(settings_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{settings_file}: not valid JSON ({e.msg})") from None
    name = name or path.resolve().name
    kind = settings.get("kind")
    if kind == "tool_loop":
        return Run(name, path, kind, load_tool_result(path))
    if kind == "coverage":
        return Run(name, path, kind, load_coverage(path))
    if "views" in settings:
        return Run(name, path, "single_pass", load_result(path))
    raise ValueError(f"{settings_file}: unknown run kind (expected a single-pass, tool-loop or coverage folder)")


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Folder names, made unique with their parent's name (then a counter) where they collide."""
    names = [p.resolve().name for p in paths]
    for i, p in enumerate(paths):
        if names.count(names[i]) > 1:
            names[i] = f"{p.resolve().parent.name}-{p.resolve().name}"
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}-{seen[n]}"
    return names


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A markdown table; the first `text_columns` columns align left, the (numeric) rest right."""
    aligns = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns[: len(header)]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _demote(markdown: str, title: str) -> str:
    """A run's own markdown under a report section: its H1 becomes `title`, H2s become H4s."""
    lines = markdown.splitlines()
    out = [f"### {title}" if i == 0 and ln.startswith("# ") else ("##" + ln if ln.startswith("## ") else ln)
           for i, ln in enumerate(lines)]
    return "\n".join(out)


def _num(x: float, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------- charts


def _point(run: Run) -> dict[str, Any] | None:
    """(samples/s, accuracy, interval) of a run's one-glance (full view) or tool-loop answers."""
    if run.kind == "single_pass":
        r: EvalResult = run.result  # type: ignore[assignment]
        if "full" not in r.items:
            return None
        acc, t = r.accuracy("full")["all"], r.timing("full")
        label = f"{run.name} (single pass)"
    elif run.kind == "tool_loop":
        tr: ToolLoopResult = run.result  # type: ignore[assignment]
        acc, t = tr.accuracy()["all"], tr.timing()
        label = f"{run.name} (tool loop{', oracle box' if tr.settings.get('oracle_box') else ''})"
    else:
        return None
    return {"label": label, "kind": run.kind, "samples_per_s": t["samples_per_s"], "accuracy": acc.acc,
            "lo": acc.lo, "hi": acc.hi, "n": acc.n}


def speed_chart(points: list[dict[str, Any]], out_png: Path) -> Path:
    """Samples/s (log scale) against accuracy with 95% intervals; one marker per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    markers = {"single_pass": "o", "tool_loop": "s"}
    for p in points:
        if not (p["samples_per_s"] > 0 and math.isfinite(p["samples_per_s"])):
            continue
        y = 100 * p["accuracy"]
        err = [[y - 100 * p["lo"]], [100 * p["hi"] - y]]
        ax.errorbar([p["samples_per_s"]], [y], yerr=err, fmt=markers[p["kind"]], capsize=3, label=p["label"])
    ax.set_xscale("log")
    ax.set_xlabel("samples / s (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)  # markers at 0 or 100 % stay whole
    ax.set_title("Speed vs accuracy: one glance vs zoom-tool loop", fontsize=10)
    if points:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    return out_png


def coverage_chart(runs: list[Run], out_png: Path) -> Path:
    """Histograms per coverage run: the share of visual attention inside the box, and the
    relative coverage (share / box area; 1 = no preference for the box)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_share, ax_rel = fig.subplots(1, 2)
    rel_max = 1.0
    series = []
    for run in runs:
        items = [it for it in run.result.items if it.error is None]  # type: ignore[union-attr]
        share = [it.share for it in items if it.share is not None and math.isfinite(it.share)]
        rel = [it.relative for it in items if it.relative is not None and math.isfinite(it.relative)]
        rel_max = max([rel_max] + rel)
        series.append((run.name, share, rel))
    for name, share, rel in series:
        ax_share.hist(share, bins=20, range=(0, 1), histtype="step", linewidth=1.5, label=name)
        ax_rel.hist(rel, bins=20, range=(0, rel_max * 1.05), histtype="step", linewidth=1.5, label=name)
    ax_share.set_xlabel("attention share inside the box")
    ax_rel.set_xlabel("relative coverage (share / box area)")
    ax_rel.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    for ax in (ax_share, ax_rel):
        ax.set_ylabel("samples")
        if series:
            ax.legend(fontsize=7)
    fig.suptitle("Attention coverage of the evidence box (last prompt token)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    return out_png


# ----------------------------------------------------------------------------- sections


def _runs_section(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        s = r.result.settings
        if isinstance(r.result, EvalResult):
            n = max((len(v) for v in r.result.items.values()), default=0)
        else:
            n = len(r.result.items)
        rows.append([r.name, r.kind, str(s.get("model")), str(s.get("benchmark") or "-"), str(n), str(r.path)])
    return "## Runs\n\n" + _table(["run", "kind", "model", "benchmark", "n", "folder"], rows, text_columns=6) + "\n"


def _speed_section(pairs: list[dict[str, Any]]) -> str:
    if not pairs:
        return ""
    rows = []
    for p in pairs:
        sp, tl = p["single_pass"], p["tool_loop"]
        rows.append([
            p["tool_run"] + (" (oracle box)" if p["oracle_box"] else ""), p["single_run"], str(p["n"]),
            _num(100 * sp["accuracy"], 1), _num(100 * tl["accuracy"], 1), f"{100 * p['accuracy_delta']:+.1f}",
            _num(sp["samples_per_s"]), _num(tl["samples_per_s"]), _num(p["speedup"], 1) + "x",
        ])
    header = ["tool loop", "single pass", "n", "single acc", "tool acc", "Δ acc", "single samples/s",
              "tool samples/s", "single-pass speedup"]
    note = ("Over the questions both runs answered; single pass = the full view. Accuracy in %. "
            "A tool loop marked oracle box zoomed on the evidence box, not on the model's own box.")
    table = _table(header, rows, text_columns=2)
    return f"## Speed vs accuracy\n\n{note}\n\n{table}\n\n![speed vs accuracy]({SPEED_CHART})\n"


def _coverage_section(runs: list[Run]) -> str:
    if not runs:
        return ""
    parts = ["## Attention coverage", "",
             "share = the last prompt token's attention inside the evidence box / its attention on all "
             "image tokens (fractional cell overlap); relative = share / box area fraction (1 = as much "
             "as the box's size; > 1 the model favours the box).", ""]
    for run in runs:
        s, summ = run.result.settings, run.result.summary()  # type: ignore[union-attr]
        parts += [f"### {run.name}", "",
                  f"model {s.get('model')}, layer {s.get('layer')} of {s.get('n_layers')}, view {s.get('view')}, "
                  f"max_pixels {s.get('max_pixels') or 'native'}; {summ['failed']} of {summ['n']} samples failed", ""]
        rows = []
        for name, entry in list(summ["by_dimension"].items()) + [("all", summ)]:
            sh, rel = entry["share"], entry["relative"]
            rows.append([name, str(sh["n"]), _num(sh["mean"], 3), _num(sh["median"], 3), _num(rel["mean"]),
                         _num(rel["median"]), _num(entry["box_area"]["mean"], 4)])
        parts += [_table(["dimension", "n", "share mean", "share median", "relative mean", "relative median",
                          "box area mean"], rows), ""]
    parts += [f"![coverage]({COVERAGE_CHART})", ""]
    return "\n".join(parts)


def _run_json(run: Run) -> dict[str, Any]:
    return {"name": run.name, "kind": run.kind, "path": str(run.path), **run.result.to_dict()}


# ----------------------------------------------------------------------------- entry point


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Combine run folders into out_dir/report.md, report.json and the charts; returns report.md's path.
    The CLI entry point of `zoomless report RUN_DIR... --out DIR`."""
    if not run_dirs:
        raise ValueError("no run folders given")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, _unique_names(paths))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    single = [r for r in runs if r.kind == "single_pass"]
    tools = [r for r in runs if r.kind == "tool_loop"]
    covs = [r for r in runs if r.kind == "coverage"]

    charts: list[str] = []
    md = ["# zoomless report", "", _runs_section(runs)]
    if single:
        md += ["## Dual view (single pass)", ""]
        for r in single:
            chart = f"accuracy_{_slug(r.name)}.png"
            gap_chart(r.result, out / chart)  # type: ignore[arg-type]
            charts.append(chart)
            text = to_markdown(r.result)  # type: ignore[arg-type]
            md += [_demote(text, r.name), "", f"![{r.name}: full vs crop]({chart})", ""]
    if tools:
        md += ["## Tool loop (Thinking with Images)", ""]
        md += [_demote(tool_markdown(r.result), r.name) + "\n" for r in tools]  # type: ignore[arg-type]

    pairs = []
    for t in tools:
        for s in single:
            if "full" not in s.result.items:  # type: ignore[union-attr]
                continue
            cmp = speed_accuracy(s.result, t.result)  # type: ignore[arg-type]
            if cmp["n"]:
                pairs.append({"tool_run": t.name, "single_run": s.name, **cmp})
    points = [p for p in (_point(r) for r in single + tools) if p is not None]
    if points:
        speed_chart(points, out / SPEED_CHART)
        charts.append(SPEED_CHART)
        md.append(_speed_section(pairs) or f"## Speed vs accuracy\n\n![speed vs accuracy]({SPEED_CHART})\n")
    if covs:
        coverage_chart(covs, out / COVERAGE_CHART)
        charts.append(COVERAGE_CHART)
        md.append(_coverage_section(covs))

    report = {"runs": [_run_json(r) for r in runs], "speed_accuracy": pairs, "points": points, "charts": charts}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    path = out / "report.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path


def _json_default(x: Any) -> Any:
    return str(x)
