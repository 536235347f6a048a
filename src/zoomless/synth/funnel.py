"""The funnel report: for every stage, how many items came in, went on, were dropped (and why) or
are still pending (a failed call, retried by the next run); and the tokens each role used.

Every stage satisfies in = out + dropped + pending, so a reader can see exactly where items died.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from zoomless.synth.store import Store, write_atomic

STAGES: tuple[tuple[str, str], ...] = (
    ("intake", "image"),
    ("regions", "image"),
    ("region_filter", "region"),
    ("questions", "region"),
    ("validation", "question"),
    ("answers", "question"),
    ("consensus", "question"),
    ("distill", "question"),
    ("difficulty", "question"),
    ("export", "sample"),
)


class Funnel:
    def __init__(self) -> None:
        self.counts = {name: {"in": 0, "out": 0} for name, _ in STAGES}
        self.dropped = {name: Counter() for name, _ in STAGES}
        self.pending = {name: Counter() for name, _ in STAGES}
        self.extra: dict[str, Any] = {}

    def enter(self, stage: str, n: int = 1) -> None:
        self.counts[stage]["in"] += n

    def keep(self, stage: str, n: int = 1) -> None:
        self.counts[stage]["out"] += n

    def drop(self, stage: str, reason: str, n: int = 1) -> None:
        self.dropped[stage][reason] += n

    def pend(self, stage: str, reason: str, n: int = 1) -> None:
        self.pending[stage][reason] += n

    def report(self, usage: dict[str, dict[str, int]]) -> dict[str, Any]:
        stages = []
        for name, unit in STAGES:
            stages.append({
                "stage": name, "unit": unit, **self.counts[name],
                "dropped": dict(sorted(self.dropped[name].items())),
                "pending": dict(sorted(self.pending[name].items())),
            })
        pending = sum(sum(s["pending"].values()) for s in stages)
        return {"stages": stages, "pending_total": pending, "tokens": usage, **self.extra}


def usage_by_role(store: Store) -> dict[str, dict[str, int]]:
    """Tokens and requests per role, summed over every run's usage log."""
    total: dict[str, Counter] = {}
    for row in store.rows("usage"):
        role = row.get("role")
        if isinstance(role, str):
            total.setdefault(role, Counter()).update({k: v for k, v in row.items() if isinstance(v, int)})
    return {role: dict(sorted(c.items())) for role, c in sorted(total.items())}


def markdown(report: dict[str, Any]) -> str:
    """The funnel as markdown tables (stages, then tokens per role)."""
    def why(counts: dict[str, int]) -> str:
        return "<br>".join(f"{n} {r}" for r, n in counts.items()) or "-"

    lines = ["# zoomless synth funnel", "", "| stage | unit | in | out | dropped | pending |",
             "|---|---|---:|---:|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['unit']} | {s['in']} | {s['out']} | {why(s['dropped'])} | "
                     f"{why(s['pending'])} |")
    if report.get("pending_total"):
        lines += ["", f"**{report['pending_total']} items are pending** (failed calls, or not reached before the "
                      "run stopped): rerun to finish them."]
    lines += ["", "## tokens per role", "",
              "| role | requests | retries | errors | prompt tokens | completion tokens |", "|---|---:|---:|---:|---:|---:|"]
    for role, u in report["tokens"].items():
        lines.append(f"| {role} | {u.get('requests', 0)} | {u.get('retries', 0)} | {u.get('errors', 0)} | "
                     f"{u.get('prompt_tokens', 0)} | {u.get('completion_tokens', 0)} |")
    for key in ("kept_by_dimension", "answer_letters"):
        if report.get(key):
            lines += ["", f"## {key.replace('_', ' ')}", "", ", ".join(f"{k}: {v}" for k, v in report[key].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path, suffix: str = "") -> tuple[Path, Path]:
    js, md = out_dir / f"funnel{suffix}.json", out_dir / f"funnel{suffix}.md"
    write_atomic(js, (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(md, markdown(report).encode())
    return js, md
