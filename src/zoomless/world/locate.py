"""An auxiliary ZoomWorld question that asks *where* the named panel is.

The CEILING runs of 2026-12-06 (docs/ZOOMWORLD.md) read a lone panel in the full scene but chose
between two panels at chance, although the panel's tokens carry its frame colour: the model never
bound the colour word of the question to the image tokens of that colour. "Where in the image is
the panel with the red border?", answered with one of nine places, rewards exactly that binding,
with no content to read. It is a training aid for a CEILING (a model trained with full-view
labels by any recipe), never a test question: it needs the full view, since a crop loses the place.
"""

from __future__ import annotations

import numpy as np

from zoomless.sample import Sample
from zoomless.world.dimensions import reference

DIMENSION = "locate"
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
QUESTION = "Where in the image is {ref}? Answer with its place, such as top left or middle center."


def place(box: tuple[int, int, int, int], size: int) -> str:
    """The cell of a 3 x 3 grid over the scene that holds the box's centre, e.g. "top left"."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = min(int(3 * cx / size), 2)
    row = min(int(3 * cy / size), 2)
    return f"{ROWS[row]} {COLS[col]}"


def as_locate(sample: Sample) -> Sample:
    """The same scene with the question "where is the evidence panel?" and its place as the answer."""
    panels = sample.meta["panels"]
    size = int(sample.meta["size"])
    places = [place(tuple(p["box"]), size) for p in panels]
    options = tuple(dict.fromkeys([places[0], *places[1:]]))  # every panel's place, answer first
    return sample.with_(question=QUESTION.format(ref=reference(sample.meta["frame"])), answer=places[0],
                        options=options if len(options) > 1 else None, dimension=DIMENSION,
                        meta={**sample.meta, "task": DIMENSION})


def is_locate(index: int, share: float, seed: int = 0) -> bool:
    """Whether scene `index` of a split asks the locate question, for a `share` of the scenes
    (a fixed draw per index, so that a split is the same every time it is built)."""
    return share > 0 and float(np.random.default_rng([seed, index, 0x10CA7E]).random()) < share
