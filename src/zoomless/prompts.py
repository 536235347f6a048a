"""Question prompts: how a sample is put to a model, as multiple choice or as an open question.

The suffixes are the ones the public benchmarks and Qwen-VL evaluations use, so scores stay
comparable. Public MCQ benchmarks often carry their options inside the question text and store the
gold as a letter; such questions are sent as they are.
"""

from __future__ import annotations

import re

from zoomless.sample import LETTERS, Sample

MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
OPEN_SUFFIX = "Answer the question using a single word or phrase."

FORMS = ("mcq", "open")

# An option marker inside a question text: "(A) ...", "A. ...", "A) ...", "A: ..." at a line start or
# after a blank; lower-case "(a)" as MMVP writes it.
_MARKER = re.compile(r"(?:^|(?<=\s))(?:\(([A-Ja-j])\)|([A-J])[.):])(?=\s|$)", re.MULTILINE)
_GOLD_LETTER = re.compile(r"^\s*\(?([A-Ja-j])\)?[.:]?\s*$")


def embedded_letters(question: str) -> list[str]:
    """The option letters written inside a question text ("(A) 0\\n(B) 2" -> ["A", "B"]), in order."""
    found: list[str] = []
    for m in _MARKER.finditer(question):
        letter = (m.group(1) or m.group(2)).upper()
        if letter not in found:
            found.append(letter)
    return found


def gold_letter(sample: Sample) -> str | None:
    """The gold option letter: from `options`, or a letter-form gold ("B", "(b)") whose options
    are written in the question text. None for open questions."""
    if sample.options:
        return sample.answer_letter
    if sample.answer is None:
        return None
    m = _GOLD_LETTER.match(sample.answer)
    if m is None:
        return None
    letter = m.group(1).upper()
    return letter if letter in embedded_letters(sample.question) else None


def n_options(sample: Sample) -> int:
    """How many options the sample offers (0 for an open question)."""
    if sample.options:
        return len(sample.options)
    if gold_letter(sample) is None:
        return 0
    letters = embedded_letters(sample.question)
    return LETTERS.index(max(letters)) + 1


def sample_form(sample: Sample, form: str) -> str:
    """The form a sample is actually asked in: "mcq" only when it has options (given as a list or
    written in the question with a letter gold); questions without options are always open.
    A letter-gold question with its options in the text is always "mcq": it has no open form."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if sample.options:
        return form
    return "mcq" if gold_letter(sample) is not None else "open"


def format_question(sample: Sample, question_text: str | None = None, form: str = "mcq") -> str:
    """The text sent to the model. `question_text` replaces the sample's question (the overlay view
    adds a sentence pointing at the box)."""
    text = question_text if question_text is not None else sample.question
    if sample.meta.get("prompt_final"):  # a public benchmark's own prompt, sent exactly as written
        return text
    text = text.strip()
    form = sample_form(sample, form)
    if form == "mcq":
        if not sample.options:  # options already in the text: send it as the benchmark wrote it
            return text
        lines = [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(sample.options)]
        return text + "\n" + "\n".join(lines) + "\n" + MCQ_SUFFIX
    return text + "\n" + OPEN_SUFFIX
