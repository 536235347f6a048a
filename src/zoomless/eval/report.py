"""Reports of a dual-view evaluation: a rich table, markdown, a bar chart, and before/after.

Accuracies are shown in percent with their 95% Wilson interval, the gap (crop - full) with its
paired 95% interval (see `metrics`). Every report names the model, the answer form, the pixel
budget, the seed and the judge, since published scores swing with each of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from zoomless.eval.metrics import Accuracy, Gap

if TYPE_CHECKING:
    from zoomless.eval.single_pass import EvalResult


def fmt_acc(a: Accuracy | None, interval: bool = True, ci_digits: int = 1) -> str:
    if a is None or a.n == 0:
        return "-"
    text = f"{100 * a.acc:.1f}"
    if not interval:
        return text
    sep = ", " if ci_digits else "-"
    return f"{text} [{100 * a.lo:.{ci_digits}f}{sep}{100 * a.hi:.{ci_digits}f}]"


def fmt_gap(g: Gap | None, interval: bool = True, ci_digits: int = 1) -> str:
    if g is None or g.n == 0:
        return "-"
    text = f"{100 * g.gap:+.1f}"
    if not interval:
        return text
    return f"{text} [{100 * g.lo:+.{ci_digits}f}, {100 * g.hi:+.{ci_digits}f}]"


def settings_line(result: "EvalResult") -> str:
    s = result.settings
    pixels = "native" if s.get("max_pixels") is None else f"{s['max_pixels']:,}"
    bench = f"{s['benchmark']}, " if s.get("benchmark") else ""
    judge = s.get("judge")
    return (
        f"{bench}model {s.get('model')}, form {s.get('form')}, max_pixels {pixels}, "
        f"seed {s.get('seed')}, {s.get('decoding', 'greedy')}, max_new_tokens {s.get('max_new_tokens')}, "
        + (f"judge {judge.get('model')}" if judge else "rules only")
    )


def judge_line(settings: dict[str, Any]) -> str:
    """How the answers were graded: the rules alone, or the rules then which judge, where, and
    what its malformed or failed verdicts scored."""
    judge = settings.get("judge")
    if not judge:
        return "Graded by rules only (no judge): an answer the rules cannot read is wrong."
    where = judge.get("base_url") or "in-process"
    fate = "are left out of the denominator" if judge.get("on_malformed") == "skip" else "count as wrong"
    return (
        f"Graded by rules, then the judge {judge.get('model')} ({where}; {judge.get('prompt')} prompt, "
        f"temperature {judge.get('temperature')}) for answers the rules could not decide; malformed or "
        f"failed verdicts {fate}."
    )


def benchmark_metric_lines(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """One line per view for the benchmark's own headline metric (CV-Bench, VisualProbe, POPE, MMVP)."""
    lines = []
    for view, m in metrics.items():
        detail = ""
        if "groups" in m:
            detail = "; " + ", ".join(f"{g} {100 * a['acc']:.1f} (n {a['n']})" for g, a in m["groups"].items())
        elif m.get("benchmark") == "pope":
            detail = "; " + ", ".join(f"{k} {100 * m[k]:.1f}" for k in ("accuracy", "precision", "recall", "f1"))
            detail += f", yes ratio {100 * m['yes_ratio']:.1f}"
        elif "pairs" in m:
            detail = f"; {m['both_right']} of {m['pairs']} pairs"
        lines.append(f"- {view}: {m['benchmark']} {m['metric']}: **{100 * m['score']:.1f}**{detail}")
    return lines


def _rows(result: "EvalResult", ci_digits: int = 1) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the rich and markdown tables: one row per dimension, then "all"."""
    views = result.views
    acc = {v: result.accuracy(v) for v in views}
    gap = result.gap()
    header = ["dimension", "n"] + [f"{v} acc" for v in views] + (["gap (crop - full)"] if gap else [])
    rows = []
    for d in result.dimensions + ["all"]:
        n = max((acc[v][d].n for v in views if d in acc[v]), default=0)
        row = [d, str(n)] + [fmt_acc(acc[v].get(d), ci_digits=ci_digits) for v in views]
        if gap:
            row.append(fmt_gap(gap.get(d), ci_digits=ci_digits))
        rows.append(row)
    return header, rows


def dual_view_table(result: "EvalResult") -> Table:
    """Rows: dimensions then "all"; columns: n, accuracy per view, the zooming gap. Interval
    bounds are whole percents here, to fit a terminal; markdown and JSON keep the decimals."""
    header, rows = _rows(result, ci_digits=0)
    table = Table(title="Dual-view accuracy (%, 95% CI)", caption=settings_line(result))
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(c, style="bold" if row[0] == "all" else "") for c in row))
    return table


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(result: "EvalResult") -> str:
    """The accuracy table, then timing and grading counts per view."""
    header, rows = _rows(result)
    parts = [
        "# Dual-view evaluation",
        "",
        settings_line(result),
        "",
        "Accuracy in %, [95% Wilson interval]; gap = crop - full, [paired 95% interval]. "
        "Failed and unparsable answers count as wrong.",
        "",
        _markdown_table(header, rows),
        "",
    ]
    if result.benchmark_metrics:
        parts += ["## Benchmark metric", "", *benchmark_metric_lines(result.benchmark_metrics), ""]
    parts += ["## Timing and grading", ""]
    judged = bool(result.settings.get("judge"))
    t_header = ["view", "p50 s", "p90 s", "p99 s", "samples/s", "unparsable", "failed"]
    if judged:
        t_header += ["judged", "judge yes", "judge no", "judge malformed", "judge failed", "excluded"]
    t_rows = []
    for v in result.views:
        t, m = result.timing(v), result.methods(v)
        row = [v, f"{t['p50_s']:.3f}", f"{t['p90_s']:.3f}", f"{t['p99_s']:.3f}", f"{t['samples_per_s']:.2f}",
               str(m.get("unparsable", 0)), str(m.get("error", 0))]
        if judged:
            j = result.judge_counts(v)
            row += [str(j[k]) for k in ("judged", "yes", "no", "malformed", "errors", "excluded")]
        t_rows.append(row)
    parts += [_markdown_table(t_header, t_rows), "", judge_line(result.settings), ""]
    return "\n".join(parts)


def gap_chart(result: "EvalResult", out_png: str | Path) -> Path:
    """Grouped bars, full vs crop accuracy per dimension (and "all"), with 95% intervals."""
    from matplotlib.figure import Figure  # the Agg canvas; no pyplot, no display needed

    views = [v for v in ("full", "crop") if v in result.views] or result.views
    dims = result.dimensions + ["all"]
    fig = Figure(figsize=(1.3 * len(dims) + 2, 4))
    ax = fig.add_subplot()
    width = 0.8 / len(views)
    for k, v in enumerate(views):
        acc = result.accuracy(v)
        xs = [i + (k - (len(views) - 1) / 2) * width for i in range(len(dims))]
        ys = [100 * acc[d].acc if d in acc else 0.0 for d in dims]
        err = [
            [100 * (acc[d].acc - acc[d].lo) if d in acc else 0.0 for d in dims],
            [100 * (acc[d].hi - acc[d].acc) if d in acc else 0.0 for d in dims],
        ]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=v)
    ax.set_xticks(range(len(dims)), dims, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{result.settings.get('model')}: full vs crop", fontsize=10)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def _compare_rows(before: "EvalResult", after: "EvalResult") -> tuple[list[str], list[list[str]]]:
    views = [v for v in before.views if v in after.views]
    acc_b = {v: before.accuracy(v) for v in views}
    acc_a = {v: after.accuracy(v) for v in views}
    gap_b, gap_a = before.gap(), after.gap()
    header = ["dimension", "n"] + [f"{v}: before → after" for v in views]
    if gap_b and gap_a:
        header.append("gap: before → after")
    rows = []
    dims = sorted(set(before.dimensions) | set(after.dimensions)) + ["all"]
    for d in dims:
        n = max((acc_a[v][d].n for v in views if d in acc_a[v]), default=0)
        row = [d, str(n)]
        for v in views:
            b, a = acc_b[v].get(d), acc_a[v].get(d)
            delta = f" ({100 * (a.acc - b.acc):+.1f})" if a and b and a.n and b.n else ""
            row.append(f"{fmt_acc(b, False)} → {fmt_acc(a, False)}{delta}")
        if gap_b and gap_a:
            row.append(f"{fmt_gap(gap_b.get(d), False)} → {fmt_gap(gap_a.get(d), False)}")
        rows.append(row)
    return header, rows


def compare_table(before: "EvalResult", after: "EvalResult") -> Table:
    """Before/after accuracy (%) per view and the gap, per dimension; the change in brackets."""
    header, rows = _compare_rows(before, after)
    caption = f"before: {settings_line(before)}\nafter: {settings_line(after)}"
    table = Table(title="Before → after (accuracy %, change)", caption=caption)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(c, style="bold" if row[0] == "all" else "") for c in row))
    return table


def compare_markdown(before: "EvalResult", after: "EvalResult") -> str:
    header, rows = _compare_rows(before, after)
    return (
        f"before: {settings_line(before)}\n\nafter: {settings_line(after)}\n\n" + _markdown_table(header, rows) + "\n"
    )


def gap_change_chart(before: "EvalResult", after: "EvalResult", out_png: str | Path) -> Path:
    """Per dimension (and "all"): full- and crop-view accuracy before and after training, so the
    gap's change and what moved it (full view up, or crop view down) are both visible."""
    from matplotlib.figure import Figure

    dims = sorted(set(before.dimensions) | set(after.dimensions)) + ["all"]
    bars = [("full, before", before, "full", "#9ecae1"), ("full, after", after, "full", "#08519c"),
            ("crop, before", before, "crop", "#fdae6b"), ("crop, after", after, "crop", "#a63603")]
    fig = Figure(figsize=(1.4 * len(dims) + 2, 4))
    ax = fig.add_subplot()
    width = 0.8 / len(bars)
    for k, (label, result, view, colour) in enumerate(bars):
        acc = result.accuracy(view)
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(dims))]
        ax.bar(xs, [100 * acc[d].acc if d in acc else 0.0 for d in dims], width, label=label, color=colour)
    ax.set_xticks(range(len(dims)), dims, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("the zooming gap before and after training", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
