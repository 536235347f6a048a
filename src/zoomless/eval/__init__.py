"""Evaluation: single-pass dual-view runs, rule grading, an optional LLM judge, metrics and reports.

    from zoomless.eval import evaluate, evaluate_file, dual_view_table, make_judge
"""

from zoomless.eval.benchmark_metrics import benchmark_metrics
from zoomless.eval.generic import load_benchmark, load_generic
from zoomless.eval.grading import Grade, extract_letter, grade, normalize
from zoomless.eval.judge import Judge, make_judge, parse_verdict
from zoomless.eval.metrics import Accuracy, Gap, paired_gap, wilson
from zoomless.eval.report import compare_markdown, compare_table, dual_view_table, gap_chart, to_markdown
from zoomless.eval.single_pass import EvalResult, ItemResult, evaluate, evaluate_file, load_result

__all__ = [
    "Accuracy",
    "EvalResult",
    "Gap",
    "Grade",
    "ItemResult",
    "Judge",
    "benchmark_metrics",
    "compare_markdown",
    "compare_table",
    "dual_view_table",
    "evaluate",
    "evaluate_file",
    "extract_letter",
    "gap_chart",
    "grade",
    "load_benchmark",
    "load_generic",
    "load_result",
    "make_judge",
    "normalize",
    "paired_gap",
    "parse_verdict",
    "to_markdown",
    "wilson",
]
