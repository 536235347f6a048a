"""Stages 6 and 7: teacher answers on the crop, then the consensus that decides the gold answer.

Extraction takes the answer a teacher marked (<answer> tags, \\boxed{}, GLM's
<|begin_of_box|>...<|end_of_box|>, "Answer: ..."); an unmarked reply counts only when it is itself
short. Failed calls are never stored, so an error placeholder can never be a vote.

Consensus by rules (default): answers agree when their canonical forms are equal (case,
punctuation, articles, number words vs digits), when they carry the same number ("5" = "five
people"), when one adds a single leading modifier ("dark red" = "red"), or when they are nearly
the same string (typos). Text readings (the ocr dimension) must match exactly, up to case and
punctuation. The kept answer is one of the teachers' own answers: the one the most
others agree with. An LLM judge can group the answers instead; it must then point at one of them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from difflib import SequenceMatcher

from zoomless.eval.grading import _numbers, answer_span, normalize, numbers_in  # _numbers: number words in place
from zoomless.synth.parsing import unmarkdown

ANSWER_PROMPT = (
    "Question: {question}\n"
    "Think step by step, then give the final answer as briefly as possible (a number, a word, a short phrase "
    "or the exact text) inside \\boxed{{}}."
)

_SPELLING = {"grey": "gray", "colour": "color", "coloured": "colored", "centre": "center", "metre": "meter"}
_MARKERS = re.compile(r"\\boxed|<answer>|<\|begin_of_box\|>", re.IGNORECASE)
_NEGATIONS = {"no", "not", "non", "without", "never"}


def extract_answer(text: str, max_chars: int = 80, uncued_max_words: int = 6) -> str | None:
    """The answer a teacher gave, or None when the reply marks none and is not itself a short answer."""
    span, cued = answer_span(text or "")
    span = span.strip().rstrip(".").strip()
    if not cued and (_MARKERS.search(text or "") or "\n" in span or len(span.split()) > uncued_max_words):
        return None  # a marker with nothing in it ("\\boxed{}"), or an unmarked long reply
    if not normalize(span) or len(span) > max_chars:
        return None
    return span


def canonical(text: str) -> str:
    """Normalized words, British spellings made American, number words written as digits."""
    words = [_SPELLING.get(w, w) for w in normalize(text).split()]
    out: list[str] = []
    i = 0
    for value, start, end in _numbers(words):
        out += words[i:start]
        out.append(str(int(value)) if value == int(value) else str(value))
        i = end
    out += words[i:]
    return " ".join(out)


def same_answer(a: str, b: str, fuzzy: float = 0.85, strict: bool = False) -> bool:
    """Whether two short answers say the same thing (see the module docstring for the rules).

    `strict` (text readings, the ocr dimension): only equal canonical forms agree ("three" = "3",
    "abc" = "ABC"); "N3YJ" and "N3YJ7" are different readings however similar.
    """
    ca, cb = canonical(a), canonical(b)
    if not ca or not cb:
        return False
    if ca == cb:
        return True
    if strict:
        return False
    na, nb = numbers_in(ca), numbers_in(cb)
    if na != nb:
        return False  # "room 101" is not "room 102", however similar the strings
    if len(na) == 1 and _num(na[0]) in (ca, cb):
        return True  # "5" vs "5 people"
    wa, wb = ca.split(), cb.split()
    short, long = sorted((wa, wb), key=len)
    if len(long) == len(short) + 1 and long[1:] == short and long[0] not in _NEGATIONS:
        return True  # "dark red" vs "red", "black cat" vs "cat"
    return min(len(ca), len(cb)) >= 4 and SequenceMatcher(None, ca, cb).ratio() >= fuzzy


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) else str(v)


@dataclass(frozen=True)
class Consensus:
    answer: str | None  # one teacher's own answer (None when nobody answered)
    votes: int  # answers that agree with it, itself included
    total: int  # votes planned (teachers x samples): failures and non-answers count against

    def reached(self, min_agreement: float) -> bool:
        return self.answer is not None and self.votes >= math.ceil(min_agreement * self.total - 1e-9)


def rule_consensus(answers: list[str | None], total: int, fuzzy: float = 0.85, strict: bool = False) -> Consensus:
    """The answer the most others agree with; ties go to the most frequent wording ("3" written five
    times beats "three" written once), then to the first."""
    given = [a for a in answers if a is not None]
    if not given:
        return Consensus(None, 0, total)
    support = [sum(same_answer(a, b, fuzzy, strict) for b in given) for a in given]
    wording = [normalize(a) for a in given]
    best = max(range(len(given)), key=lambda k: (support[k], wording.count(wording[k]), -k))
    return Consensus(given[best], support[best], total)


# ----------------------------------------------------------------------------- LLM judge (option)

JUDGE_PROMPT = """Several people answered the same question about an image.
Question: {question}
{answers}

Group the answers that mean the same thing. Equivalent: different wording of the same answer ("5 people" = "five people"), a small descriptive variation of the same thing, nearly the same precision ("brown" = "dark brown"). Not equivalent: different objects, numbers, texts or concepts, or a different reading of the question.
Find the largest group. End your reply with exactly these two lines:
GROUP: the numbers of all answers in the largest group, separated by commas
BEST: the number of the answer in that group that states it best"""

_GROUP = re.compile(r"^\s*GROUP\s*:\s*([\d,\s]+?)\s*$", re.IGNORECASE | re.MULTILINE)
_BEST = re.compile(r"^\s*BEST\s*:\s*(\d+)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)


def judge_prompt(question: str, answers: list[str | None]) -> str:
    lines = [f"Answer {i + 1}: {a if a is not None else '(no answer)'}" for i, a in enumerate(answers)]
    return JUDGE_PROMPT.format(question=question, answers="\n".join(lines))


def parse_judge(text: str, answers: list[str | None], total: int) -> Consensus | None:
    """The judge's group as a Consensus, or None when the reply is not a valid grouping (numbers that
    name no answer, a BEST outside the group, missing lines)."""
    clean = unmarkdown(text or "")
    groups, bests = _GROUP.findall(clean), _BEST.findall(clean)
    if not groups or not bests:
        return None
    try:
        group = {int(x) for x in groups[-1].replace(",", " ").split()}
    except ValueError:
        return None
    best = int(bests[-1])
    valid = {i + 1 for i, a in enumerate(answers) if a is not None}
    if not group or not group <= valid or best not in group:
        return None
    return Consensus(answers[best - 1], len(group), total)
