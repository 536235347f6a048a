"""Stage 5, validation: the validator sees the full image AND the crop and checks each question
on the four criteria of the reference rubric. Parsing is strict: one clear verdict line, or the
question is invalid.
"""

from __future__ import annotations

import re

from PIL import Image

from zoomless.engines.base import Conversation
from zoomless.synth.parsing import unmarkdown

RUBRIC = """Question: {question}

Decide whether this question is a good test of a small detail. It is VALID only if all four criteria hold:
1. Answerable from the crop: the cropped image alone is enough to answer it; nothing outside the crop is needed.
2. One answer in the full image: the original image contains no other instance of the target that would give a different answer.
3. Consistent: the answer read from the crop is the same as the answer read from the original image.
4. Unambiguous: the target is named precisely - no vague "it", "this" or "the object" when several candidates exist, no unclear viewpoint, no vague quantities.
Example of an INVALID question: "What number is painted on the boat?" when the original image shows two boats with different numbers and the crop shows only one of them.

Think step by step, then end your reply with exactly these two lines:
VALID: Yes or No
REASON: one sentence"""

_VERDICT = re.compile(r"^\s*VALID\s*:\s*(yes|no)\s*[.!]?\s*$", re.IGNORECASE | re.MULTILINE)
_REASON = re.compile(r"^\s*REASON\s*:\s*(.+?)(?:\n\s*\n|\Z)", re.IGNORECASE | re.MULTILINE | re.DOTALL)


def validation_conversation(full: Image.Image, crop: Image.Image, question: str) -> Conversation:
    """Original image, then the crop, each introduced by its name, then the rubric."""
    content = [
        {"type": "text", "text": "Original image:"},
        {"type": "image", "image": full},
        {"type": "text", "text": "Cropped image (a zoomed-in region of the original):"},
        {"type": "image", "image": crop},
        {"type": "text", "text": RUBRIC.format(question=question)},
    ]
    return [{"role": "user", "content": content}]


VERDICTS = {
    "yes": "valid",
    "no": "the validator said No",
    "missing": "no verdict line in the reply",
    "conflicting": "conflicting verdict lines",
}


def parse_verdict(text: str) -> tuple[str, str]:
    """(verdict, reason): verdict is "yes", "no", "missing" or "conflicting"; only "yes" passes.

    A verdict is a whole line "VALID: Yes" or "VALID: No" (markdown allowed). An echo of the
    instruction ("VALID: Yes or No") is no verdict.
    """
    clean = unmarkdown(text)
    verdicts = {v.lower() for v in _VERDICT.findall(clean)}
    found = _REASON.findall(clean)
    reason = " ".join(found[-1].split())[:300] if found else ""
    if not verdicts:
        return "missing", reason
    if len(verdicts) > 1:
        return "conflicting", reason
    return verdicts.pop(), reason
