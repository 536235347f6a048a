"""Stage 9, the difficulty filter: a student-sized proxy answers the distilled question on the
overlay k times; the item is kept only when at most `max_correct` of them are right (the
reference keeps items an 8B model solves at most 1 time in 4). Grading is by rule
(eval/grading.py): the chosen letter, or the open answer. A failed call leaves the item
unfinished, never kept.
"""

from __future__ import annotations

from zoomless.eval.grading import grade
from zoomless.sample import Sample

STEP_BY_STEP = {
    "mcq": "Think step by step, then put the letter of your answer in \\boxed{}.",
    "open": "Think step by step, then put your final answer in \\boxed{}.",
}


def student_prompt(problem: str, form: str) -> str:
    return f"{problem}\n{STEP_BY_STEP[form]}"


def count_correct(replies: list[str], answer: str, options: tuple[str, ...] | None, form: str) -> int:
    """How many replies choose the answer (mcq: its letter; open: the same text or number)."""
    sample = Sample(id="difficulty", image="", question="q", answer=answer, options=options)
    return sum(grade(sample, reply, form=form).correct for reply in replies)
