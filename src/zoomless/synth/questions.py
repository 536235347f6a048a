"""Stage 4, questions on the crop: the questioner sees only the zoomed crop and writes short,
exactly answerable questions, each tagged with a perceptual dimension.

Few-shot examples come from a seed list spread over the six dimensions (counting, ocr, color,
structure, material, object); each crop gets its own seeded draw, taken round-robin over the
dimensions so that every dimension is shown.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoomless.eval.grading import normalize
from zoomless.synth.config import SynthError
from zoomless.synth.parsing import json_list
from zoomless.world.dimensions import DIMENSIONS

# Written for this project: angles of questioning, not templates to copy.
SEED_QUESTIONS: dict[str, tuple[str, ...]] = {
    "counting": (
        "How many windows are on the front of the small white house?",
        "How many buttons are on the remote control lying on the table?",
        "How many birds are sitting on the power line?",
        "How many legs does the wooden stool have?",
        "How many candles are on the birthday cake?",
        "How many spokes does the front wheel of the bicycle have?",
    ),
    "ocr": (
        "What word is printed on the red shop awning?",
        "What is the number on the jersey of the goalkeeper?",
        "What time does the clock on the tower show?",
        "What is written on the license plate of the blue car?",
        "What phone number is painted on the side of the delivery van?",
        "What brand name appears on the coffee cup?",
    ),
    "color": (
        "What color is the umbrella held by the woman at the bus stop?",
        "What color are the laces of the running shoe?",
        "What color is the door of the lighthouse?",
        "What color is the cap on the water bottle?",
        "What color is the stripe along the side of the train?",
        "What color is the flower in the window box?",
    ),
    "structure": (
        "What shape is the sign mounted on the lamppost?",
        "Is the window above the door round or rectangular?",
        "Which way does the arrow on the road sign point?",
        "How is the rope attached to the boat: tied to a ring or to a post?",
        "Does the chair by the fireplace have armrests?",
        "What shape are the holes in the metal grate?",
    ),
    "material": (
        "What material is the fence around the garden made of?",
        "Is the vase on the shelf made of glass or of clay?",
        "What pattern covers the cushion on the sofa?",
        "What is the surface of the path made of: gravel, stone slabs or wood?",
        "Is the handle of the knife made of wood, metal or plastic?",
        "What texture does the wall behind the bench have?",
    ),
    "object": (
        "What is the person on the bench holding in their left hand?",
        "What animal is sitting on the windowsill?",
        "What object hangs from the hook next to the door?",
        "What kind of vehicle is parked under the tree?",
        "What flag flies on the mast of the sailboat?",
        "What fruit is in the bowl on the kitchen counter?",
    ),
}


def dimension_of(text: Any) -> str | None:
    """A dimension name from a model's or user's wording ("colour", "text", "shape"...), else None."""
    aliases = {
        "count": "counting", "number": "counting", "text": "ocr", "reading": "ocr", "colour": "color",
        "shape": "structure", "structural": "structure", "texture": "material", "pattern": "material",
        "identity": "object", "object identification": "object", "identification": "object",
    }
    if not isinstance(text, str):
        return None
    t = text.strip().lower()
    return t if t in DIMENSIONS else aliases.get(t)


@dataclass(frozen=True)
class Question:
    text: str
    dimension: str | None


def load_seeds(path: Path | None) -> dict[str, tuple[str, ...]]:
    """The seed list: built in, or a JSON list of {"question", "dimension"} from `path`."""
    if path is None:
        return SEED_QUESTIONS
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SynthError(f"questions.seeds_file: cannot read {path} ({e})") from None
    if not isinstance(rows, list):
        raise SynthError(f"{path}: must be a JSON list of {{\"question\", \"dimension\"}} objects")
    seeds: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        q = row.get("question") if isinstance(row, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise SynthError(f"{path}: item {i}: 'question' must be a non-empty string")
        dim = dimension_of(row.get("dimension")) or "object"
        seeds.setdefault(dim, []).append(q.strip())
    return {d: tuple(qs) for d, qs in seeds.items()}


def pick_seeds(seeds: dict[str, tuple[str, ...]], k: int, seed: int) -> list[tuple[str, str]]:
    """k (dimension, question) pairs, taken round-robin over the dimensions in a seeded order."""
    rng = random.Random(seed)
    pools = {d: rng.sample(list(qs), len(qs)) for d, qs in seeds.items() if qs}
    order = sorted(pools)
    rng.shuffle(order)
    picked: list[tuple[str, str]] = []
    while len(picked) < k and any(pools.values()):
        for d in order:
            if pools[d] and len(picked) < k:
                picked.append((d, pools[d].pop()))
    return picked


def question_prompt(n: int, examples: list[tuple[str, str]]) -> str:
    lines = [
        "This image is a zoomed-in crop of one small region of a larger photograph.",
        f"Write {n} questions about what this crop shows. Each question must:",
        "- have one short, exact answer (a number, a word, a short phrase, or the text that is written) "
        "that can be read from this crop alone;",
        "- name its target precisely (never \"it\" or \"this object\"), so that it is unambiguous in the whole "
        "photograph as well;",
        "- ask about a different kind of detail than the others: counting, ocr (reading text), color, "
        "structure (shape, parts, direction), material (material, texture, pattern) or object (what something is).",
    ]
    if examples:
        lines.append("Examples of questioning angles (for inspiration only; do not copy them):")
        lines += [f"- [{d}] {q}" for d, q in examples]
    lines += [
        "If the crop is too blurry or empty to ask anything, answer with [].",
        "Answer with a JSON list in a ```json block:",
        '```json\n[{"question": "...", "dimension": "counting"}, {"question": "...", "dimension": "color"}]\n```',
    ]
    return "\n".join(lines)


def parse_questions(text: str, n: int, max_chars: int) -> tuple[list[Question], str | None]:
    """Up to n distinct questions from a questioner reply, and the reason when there are none.

    Each entry is {"question": str, "dimension"?: str} or a plain string; questions shorter than
    three words or longer than `max_chars` are skipped.
    """
    items = json_list(text)
    if items is None:
        return [], "no JSON list of questions in the reply"
    out: list[Question] = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            q, dim = item, None
        elif isinstance(item, dict) and isinstance(item.get("question"), str):
            q, dim = item["question"], item.get("dimension")
        else:
            continue
        q = " ".join(q.split())
        norm = normalize(q)
        if len(q.split()) < 3 or len(q) > max_chars or norm in seen:
            continue
        seen.add(norm)
        out.append(Question(q, dimension_of(dim)))
        if len(out) == n:
            break
    if not out:
        return [], "the model wrote no usable question" if items else "the model declined (empty list)"
    return out, None


assert set(SEED_QUESTIONS) == set(DIMENSIONS)
