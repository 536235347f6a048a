"""The six ZoomWorld dimensions (mirroring ZoomBench): their values, questions and panel contents.

Each panel of a scene shows one value of the scene's dimension: a number of dots, a short string,
a coloured shape, a shape, a texture or a pictogram. The question names the evidence panel by its
frame colour, which no other panel in the scene has.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from zoomless.world import draw as d

DIMENSIONS: tuple[str, ...] = ("counting", "ocr", "color", "structure", "material", "object")

# Named colours, far apart so that a crop settles the name. Content ink is drawn in exactly these.
COLORS: dict[str, d.RGB] = {
    "red": (220, 30, 40),
    "orange": (245, 130, 20),
    "yellow": (235, 200, 0),
    "green": (30, 150, 60),
    "blue": (35, 85, 220),
    "purple": (130, 60, 180),
    "pink": (240, 110, 190),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "cyan": (0, 185, 205),
}
# Panel frames: saturated colours that stay visible as thin lines in a downscaled view.
FRAME_COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "cyan")
PANEL_FILL: d.RGB = (246, 244, 238)

# Text ink: colours with good contrast on the panel fill. Characters that look alike (0/O/Q/D,
# 1/I/L, 2/Z, 5/S, 6/G, 8/B, U/V) are left out so every string has one reading.
TEXT_COLORS: tuple[str, ...] = ("red", "green", "blue", "purple", "brown", "black")
OCR_ALPHABET = "ACEFHJKMNPRTWXY3479"
# The closed OCR vocabulary of `ocr="words"` worlds: short words spelled in OCR_ALPHABET, so that
# reading text is recognising one of a few words (like every other dimension) rather than
# spelling 3-4 random characters, which the from-scratch ZoomWorld models never learned.
OCR_WORDS: tuple[str, ...] = ("CAT", "HEN", "MAP", "NET", "JAM", "FAN", "RAY", "YAK", "WAX", "ARK")
OCR_MODES: tuple[str, ...] = ("strings", "words")

COUNTS: tuple[str, ...] = tuple(str(i) for i in range(1, 7))
SHAPES: tuple[str, ...] = tuple(d.SHAPE_PRIMS)
MATERIALS: tuple[str, ...] = ("stripes", "dots", "checker", "grid", "zigzag", "solid")
OBJECTS: tuple[str, ...] = tuple(d.OBJECT_PRIMS)

# Question templates; {ref} names the panel ("the panel with the red border").
QUESTIONS: dict[str, tuple[str, ...]] = {
    "counting": ("How many dots are inside {ref}?", "Count the dots in {ref}. How many are there?"),
    "ocr": ("What text is written in {ref}?", "Read the characters shown in {ref}. What do they say?"),
    "color": ("What color is the shape in {ref}?", "Which color does the shape inside {ref} have?"),
    "structure": ("What shape is drawn in {ref}?", "Which geometric shape appears inside {ref}?"),
    "material": ("What pattern fills {ref}?", "Which texture pattern is shown inside {ref}?"),
    "object": ("What object is drawn in {ref}?", "Which object does the pictogram in {ref} show?"),
}

# Panel width / height per dimension: text needs a wide panel to be large.
ASPECT: dict[str, float] = {"ocr": 1.8}


def reference(frame: str) -> str:
    return f"the panel with the {frame} border"


def value_pool(dimension: str, ocr: str = "strings") -> tuple[str, ...] | None:
    """The closed set of values of a dimension; None for ocr strings (drawn at random), OCR_WORDS
    for ocr="words"."""
    pools = {"counting": COUNTS, "color": tuple(COLORS), "structure": SHAPES, "material": MATERIALS, "object": OBJECTS}
    if ocr not in OCR_MODES:
        raise ValueError(f"unknown ocr mode {ocr!r}; choose from {list(OCR_MODES)}")
    if dimension == "ocr":
        return OCR_WORDS if ocr == "words" else None
    if dimension not in pools:
        raise ValueError(f"unknown dimension {dimension!r}; choose from {list(DIMENSIONS)}")
    return pools[dimension]


def random_string(rng: np.random.Generator) -> str:
    n = int(rng.integers(3, 5))
    return "".join(rng.choice(list(OCR_ALPHABET), size=n, replace=False).tolist())


def distinct_values(dimension: str, n: int, rng: np.random.Generator, ocr: str = "strings") -> list[str]:
    """n different values of `dimension`."""
    pool = value_pool(dimension, ocr)
    if pool is None:
        out: list[str] = []
        while len(out) < n:
            s = random_string(rng)
            if s not in out:
                out.append(s)
        return out
    if n > len(pool):
        raise ValueError(f"dimension {dimension!r} has only {len(pool)} values, {n} asked")
    return rng.choice(list(pool), size=n, replace=False).tolist()


def ink_colour(dimension: str, value: str, rng: np.random.Generator) -> str:
    """The colour name a panel's content is drawn in (the value itself for 'color')."""
    if dimension == "color":
        return value
    names = TEXT_COLORS if dimension == "ocr" else tuple(c for c in COLORS if c != "gray")
    return str(rng.choice(list(names)))


def draw_content(
    image: Image.Image, box: d.Box, dimension: str, value: str, colour: str, seed: int = 0, bg: d.RGB = PANEL_FILL
) -> None:
    """Draw one value of `dimension` filling `box`, in the named colour; `bg` is used for holes."""
    ink = COLORS[colour]
    draw = ImageDraw.Draw(image)
    if dimension == "counting":
        d.draw_dots(draw, box, int(value), ink, seed)
    elif dimension == "ocr":
        d.draw_text(draw, box, value, ink)
    elif dimension == "color":
        d.draw_prims(draw, d.SHAPE_PRIMS[SHAPES[seed % len(SHAPES)]], box, ink, bg)
    elif dimension == "structure":
        d.draw_prims(draw, d.SHAPE_PRIMS[value], box, ink, bg)
    elif dimension == "material":
        x1, y1, x2, y2 = d.square_in(box)
        d.paint_mask(image, (x1, y1, x2, y2), d.texture_mask(value, y2 - y1, x2 - x1), ink)
    elif dimension == "object":
        d.draw_prims(draw, d.OBJECT_PRIMS[value], box, ink, bg)
    else:
        raise ValueError(f"unknown dimension {dimension!r}; choose from {list(DIMENSIONS)}")
