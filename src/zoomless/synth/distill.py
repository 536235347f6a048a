"""Stage 8, distillation onto the full image: the red-box overlay, the sentence that points at it,
and the multiple-choice form (distractors from a teacher) or the open form.

Options: the answer plus distractors that differ from it and from each other (by the consensus
rules, so "five" is not a distractor of "5"), shuffled with a seed fixed by the item, and the
answer's position drawn uniformly from the same seed, so letters are balanced in expectation and
the same item always gets the same letter.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

from zoomless.eval.grading import normalize
from zoomless.imaging import crop_view, expand_box, overlay_view, with_pointing_sentence, zoom_view
from zoomless.prompts import OPEN_SUFFIX
from zoomless.sample import LETTERS
from zoomless.synth.answers import same_answer
from zoomless.synth.parsing import json_list
from zoomless.synth.store import write_atomic

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices."  # the reference's wording

DISTRACTOR_PROMPT = """The red box in the image marks the region the question is about.
Question: {question}
Correct answer: {answer}

Write {k} wrong answers for a multiple-choice version of this question. Each must be plausible at first glance, clearly different from the correct answer and from each other, and similar to the correct answer in form and length (a number for a number, a color for a color, a short text for a text).
Answer with a JSON list of {k} strings in a ```json block."""


def overlay(image: Image.Image, box, margin: float = 0.05, width: int = 5) -> Image.Image:
    """The full image with a red outline around the box grown by `margin` (the reference overlay)."""
    return overlay_view(image, box, margin=margin, width=width)


def overlay_crop(overlay_image: Image.Image, box, margin: float, zoom: float) -> Image.Image:
    """A zoomed crop of the overlay that shows the red outline (a Vision-OPD style teacher image)."""
    w, h = overlay_image.size
    outlined = expand_box(box, margin, w, h)
    crop, _ = crop_view(overlay_image, outlined, margin=0.1)
    return zoom_view(crop, zoom)


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically (a crash never leaves a half file that looks done)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    write_atomic(path, buf.getvalue())
    return path


def distractor_prompt(question: str, answer: str, k: int) -> str:
    return DISTRACTOR_PROMPT.format(question=with_pointing_sentence(question), answer=answer, k=k)


def parse_distractors(
    text: str, answer: str, k: int, fuzzy: float = 0.85, strict: bool = False
) -> tuple[list[str], str | None]:
    """k distinct wrong options from a reply, and the reason when there are fewer (`strict` as in
    answers.same_answer)."""
    items = json_list(text)
    if items is None:
        return [], "no JSON list of distractors in the reply"
    out: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            continue
        s = " ".join(str(item).split())
        if not normalize(s) or len(s) > 80:
            continue
        if same_answer(s, answer, fuzzy, strict) or any(same_answer(s, o, fuzzy, strict) for o in out):
            continue  # the answer in other words, or a repeat
        out.append(s)
    if len(out) < k:
        return [], f"fewer than {k} distinct distractors"
    return out[:k], None


def build_options(answer: str, distractors: list[str], seed: int) -> tuple[tuple[str, ...], str]:
    """(options, letter of the answer): distractors shuffled, the answer at a seeded uniform position."""
    rng = random.Random(seed)
    ds = list(distractors)
    rng.shuffle(ds)
    pos = rng.randrange(len(ds) + 1)
    return tuple(ds[:pos] + [answer] + ds[pos:]), LETTERS[pos]


def mcq_problem(question: str, options: tuple[str, ...], pointing: bool = True) -> str:
    """The reference MCQ text: question, pointing sentence, lettered options, letter instruction.
    Without `pointing` (an image with no box drawn) the sentence is left out."""
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    head = with_pointing_sentence(question) if pointing else question
    return f"{head}\n\n{lines}\n\n{MCQ_INSTRUCTION}"


def open_problem(question: str, pointing: bool = True) -> str:
    head = with_pointing_sentence(question) if pointing else question
    return f"{head}\n\n{OPEN_SUFFIX}"
