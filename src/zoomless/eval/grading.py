"""Rule grading of model answers: pure functions, no judge model.

Pipeline for one prediction:
  1. `answer_span`: drop <think> blocks; take the text inside <answer>...</answer>, \\boxed{...},
     GLM's <|begin_of_box|>...<|end_of_box|>, or after "answer is" / "Answer:"; else the whole text.
  2. Multiple choice: `extract_letter` finds the chosen letter, or the option whose text was written.
     Open questions: normalized exact match, numbers (digits or words), yes/no.
  3. Anything unparsable, empty or failed is wrong and stays in the denominator.

A capital letter inside a sentence is not an answer: "A red car" does not choose option A (it
chooses the option whose text is "red car" or "red", if exactly one such option exists).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from zoomless.prompts import gold_letter, n_options, sample_form
from zoomless.sample import LETTERS, Sample

METHODS = ("letter", "exact", "number", "unparsable", "error")


@dataclass(frozen=True)
class Grade:
    correct: bool
    parsed: str | None  # the letter, the normalized text or the number that was compared
    method: str  # one of METHODS


# ----------------------------------------------------------------------------- normalisation

_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed. Decimal points and
    thousands separators inside numbers survive ("1,000.5" -> "1000.5")."""
    t = text.lower().strip()
    t = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", t)
    t = re.sub(r"(?<=\d)\.(?=\d)", "\x00", t)  # protect decimal points from the punctuation pass
    words = re.sub(r"[^\w\s\x00]|_", " ", t).replace("\x00", ".").split()
    kept = [w for w in words if w not in _ARTICLES]
    return " ".join(kept if kept else words)  # an answer that is only "A" keeps it


_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_UNITS["none"] = 0
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_NUMBER_RE = re.compile(r"^-?\d+(\.\d+)?$")


def _numbers(words: Sequence[str]) -> list[tuple[float, int, int]]:
    """Numbers in a list of normalized words, as (value, first word, end word). Number words
    combine: "twenty one" = 21, "two hundred five" = 205."""
    out: list[tuple[float, int, int]] = []
    cur: float | None = None
    start = 0

    def flush(end: int) -> None:
        nonlocal cur
        if cur is not None:
            out.append((cur, start, end))
        cur = None

    for i, w in enumerate(words):
        if _NUMBER_RE.match(w):
            flush(i)
            out.append((float(w), i, i + 1))
        elif w in _UNITS:
            u = _UNITS[w]
            if cur is not None and (u < 10 and cur % 100 >= 20 and cur % 10 == 0 or cur >= 100 and cur % 100 == 0):
                cur += u  # "twenty one", "two hundred twelve"
            else:
                flush(i)
                cur, start = float(u), i
        elif w in _TENS:
            if cur is not None and cur >= 100 and cur % 100 == 0:
                cur += _TENS[w]
            else:
                flush(i)
                cur, start = float(_TENS[w]), i
        elif w == "hundred" and cur is not None and 0 < cur < 100:
            cur *= 100
        elif w == "and" and cur is not None and cur >= 100:
            continue  # "one hundred and five"
        else:
            flush(i)
    flush(len(words))
    return out


def parse_number(text: str) -> float | None:
    """The number a whole answer spells ("3", "Three.", "twenty-one", "3.50"), else None."""
    words = normalize(text).split()
    nums = _numbers(words)
    if len(nums) == 1 and nums[0][1] == 0 and nums[0][2] == len(words):
        return nums[0][0]
    return None


def numbers_in(text: str) -> list[float]:
    """The distinct numbers written in a text, in order of appearance."""
    seen: list[float] = []
    for v, _, _ in _numbers(normalize(text).split()):
        if v not in seen:
            seen.append(v)
    return seen


def _format_number(v: float) -> str:
    return str(int(v)) if v == int(v) else str(v)


# ----------------------------------------------------------------------------- answer span

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_GLM_BOX = re.compile(r"<\|begin_of_box\|>(.*?)(?:<\|end_of_box\|>|$)", re.DOTALL)
_CUE = re.compile(
    r"\b(?:final answer|correct answer|the answer|answer|correct option|my choice)\s*(?:is|would be|:)\s*:?\s*"
    r"(?:option|choice|letter)?\s*:?\s*([^\n]*)",
    re.IGNORECASE,
)


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 0, i + len("\\boxed")
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
    return text[j + 1 :]


def _clean(text: str) -> str:
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    return text.replace("**", "").replace("__", "").strip()


def answer_span(text: str) -> tuple[str, bool]:
    """The part of a model output that holds the answer, and whether an explicit cue marked it."""
    text = _THINK.sub("", text)
    for finder in (
        lambda t: (m := _ANSWER_TAG.findall(t)) and m[-1],
        _boxed,
        lambda t: (m := _GLM_BOX.findall(t)) and m[-1],
        lambda t: (m := _CUE.findall(_clean(t))) and m[-1],
    ):
        found = finder(text)
        if found and found.strip():
            inner = _boxed(found)  # "<answer>\boxed{B}</answer>"
            return _clean(inner if inner is not None else found), True
    return _clean(text), False


# ----------------------------------------------------------------------------- letters

# A bare "A" or "I" followed by a word is an article or a pronoun, unless the word is one of these.
_AFTER_LETTER = {"is", "was", "because", "since", "as", "and", "or", "which", "it", "seems", "would", "should"}


def _letter_word_ok(s: str, m: re.Match) -> bool:
    """False for a capital A or I used as an English word ("A red car", "I think")."""
    if m.group(1) not in "AI":
        return True
    nxt = re.match(r"\s+([A-Za-z]+)", s[m.end() :])
    return nxt is None or nxt.group(1).lower() in _AFTER_LETTER


def option_by_text(text: str, options: Sequence[str]) -> int | None:
    """The index of the option a text names: the normalized text equals one option, or it
    contains exactly one option's text (an option contained in a longer contained one yields)."""
    norm_text = normalize(text)
    norm_opts = [normalize(o) for o in options]
    exact = [i for i, o in enumerate(norm_opts) if o and o == norm_text]
    if len(exact) == 1:
        return exact[0]
    hits = [i for i, o in enumerate(norm_opts) if o and re.search(rf"(?<!\w){re.escape(o)}(?!\w)", norm_text)]
    # "red" inside a named "dark red" is not a second answer
    hits = [i for i in hits if not any(norm_opts[i] != norm_opts[j] and norm_opts[i] in norm_opts[j] for j in hits)]
    return hits[0] if len(hits) == 1 else None


def _letter_in(s: str, letters: str, options: Sequence[str] | None, cued: bool) -> str | None:
    s = s.strip().strip("*").strip()
    if not s:
        return None
    # the whole answer is a letter: "B", "(b)", "[C].", "d"
    m = re.fullmatch(r"[(\[]?\s*([A-Ja-j])\s*[)\]]?\s*[.:,;!]?", s)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    # the answer starts with an option marker: "(B) red", "B. red", "B) red", "B: red"
    m = re.match(r"[(\[]([A-Ja-j])[)\]]", s) or re.match(r"([A-J])[.):](?=\s|$)", s)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    # after an explicit cue, a leading capital letter: "the answer is B because ..."
    if cued:
        m = re.match(r"([A-J])(?=[\s,;]|$)", s)
        if m and m.group(1) in letters and _letter_word_ok(s, m):
            return m.group(1)
    if options:
        i = option_by_text(s, options)
        if i is not None:
            return LETTERS[i]
    # a single distinct parenthesised letter anywhere: "I would pick (C) here"
    found = {x.upper() for x in re.findall(r"\(([A-Ja-j])\)", s)} & set(letters)
    if len(found) == 1:
        return found.pop()
    if found:
        return None  # several different letters: ambiguous
    # a single distinct stand-alone capital letter: "Option C.", "I choose B"
    found = set()
    for m in re.finditer(r"(?<![\w'’.])([A-J])(?![\w'’]|\.\w)", s):
        if m.group(1) in letters and _letter_word_ok(s, m):
            found.add(m.group(1))
    return found.pop() if len(found) == 1 else None


def extract_letter(text: str, n_options: int, options: Sequence[str] | None = None) -> str | None:
    """The option letter a model answer chooses among the first `n_options` letters, or None.
    With `options`, an answer that writes an option's text also counts."""
    if options is not None:
        n_options = len(options)
    letters = LETTERS[:n_options]
    span, cued = answer_span(text)
    tries = [(span, True)] if cued else []
    tries.append((_clean(_THINK.sub("", text)), False))
    for s, is_cued in tries:
        letter = _letter_in(s, letters, options, is_cued)
        if letter is not None:
            return letter
    return None


# ----------------------------------------------------------------------------- grading

def yes_no(text: str) -> str | None:
    """"yes" or "no" when the answer says exactly one of them (or starts with one)."""
    words = normalize(text).split()
    if words and words[0] in ("yes", "no"):
        return words[0]
    said = {w for w in words if w in ("yes", "no")}
    return said.pop() if len(said) == 1 else None


def _grade_open(sample: Sample, prediction: str) -> Grade:
    gold = sample.answer or ""
    span, _ = answer_span(prediction)
    pred = normalize(span)
    if not pred:
        return Grade(False, None, "unparsable")
    norm_gold = normalize(gold)
    if pred == norm_gold:
        return Grade(True, pred, "exact")
    if norm_gold in ("yes", "no"):
        said = yes_no(span)
        return Grade(said == norm_gold, said, "exact") if said else Grade(False, None, "unparsable")
    gold_num = parse_number(gold)
    if gold_num is not None:
        nums = numbers_in(span)
        if len(nums) != 1:  # none, or "3 or 4": no single number to compare
            return Grade(False, None, "unparsable")
        return Grade(abs(nums[0] - gold_num) < 1e-9, _format_number(nums[0]), "number")
    if sample.options:  # the distractors are known: an answer naming exactly one option is that option
        i = option_by_text(span, sample.options)
        if i is not None:
            return Grade(sample.options[i] == gold, normalize(sample.options[i]), "exact")
    return Grade(False, pred, "exact")


def grade(sample: Sample, prediction: str | None, form: str = "mcq", error: str | None = None) -> Grade:
    """Grade one model answer against the sample's gold. A failed item (`error`, or no
    prediction) is wrong with method "error"; an answer that yields nothing comparable is wrong
    with method "unparsable"."""
    if sample.answer is None:
        raise ValueError(f"sample {sample.id!r}: no gold answer to grade against")
    if error is not None or prediction is None:
        return Grade(False, None, "error")
    if sample_form(sample, form) == "mcq":
        letter = extract_letter(prediction, n_options(sample), sample.options)
        if letter is None:
            return Grade(False, None, "unparsable")
        return Grade(letter == gold_letter(sample), letter, "letter")
    return _grade_open(sample, prediction)
