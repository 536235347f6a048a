"""Drawing primitives for ZoomWorld: shapes, textures, pictograms, text and dot groups.

Every function draws one item into a box (x1, y1, x2, y2; x2/y2 exclusive) of a PIL image and is a
pure function of its arguments, so a test can redraw any panel from its record. No anti-aliasing
except in text: a colour named in a record is exactly the RGB drawn.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]

# ----------------------------------------------------------------------------- shapes and pictograms
# An item is a list of primitives in unit coordinates (0..1 over a square); "fg" is the ink colour,
# "bg" cuts holes (a door, a key ring) in the colour of whatever lies behind.


def _star(points: int = 5, inner: float = 0.42) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * points):
        r = 0.48 if k % 2 == 0 else 0.48 * inner
        a = -math.pi / 2 + k * math.pi / points
        pts.append((0.5 + r * math.cos(a), 0.52 + r * math.sin(a)))
    return pts


def _regular(n: int, r: float = 0.48, rot: float = 0.0) -> list[tuple[float, float]]:
    angles = [rot + 2 * math.pi * k / n for k in range(n)]
    return [(0.5 + r * math.cos(a), 0.5 + r * math.sin(a)) for a in angles]


SHAPE_PRIMS: dict[str, list[tuple]] = {
    "circle": [("ellipse", (0.04, 0.04, 0.96, 0.96), "fg")],
    "square": [("rect", (0.1, 0.1, 0.9, 0.9), "fg")],
    "triangle": [("poly", [(0.5, 0.05), (0.97, 0.9), (0.03, 0.9)], "fg")],
    "star": [("poly", _star(), "fg")],
    "cross": [("rect", (0.35, 0.04, 0.65, 0.96), "fg"), ("rect", (0.04, 0.35, 0.96, 0.65), "fg")],
    "diamond": [("poly", [(0.5, 0.02), (0.98, 0.5), (0.5, 0.98), (0.02, 0.5)], "fg")],
    "hexagon": [("poly", _regular(6), "fg")],
    "crescent": [("ellipse", (0.04, 0.04, 0.96, 0.96), "fg"), ("ellipse", (0.3, 0.0, 1.0, 0.7), "bg")],
}

OBJECT_PRIMS: dict[str, list[tuple]] = {
    "house": [
        ("poly", [(0.05, 0.5), (0.5, 0.06), (0.95, 0.5)], "fg"),
        ("rect", (0.17, 0.46, 0.83, 0.94), "fg"),
        ("rect", (0.43, 0.66, 0.59, 0.94), "bg"),  # door
        ("rect", (0.24, 0.56, 0.36, 0.68), "bg"),  # window
    ],
    "tree": [
        ("rect", (0.42, 0.62, 0.58, 0.96), "fg"),
        ("poly", [(0.5, 0.03), (0.82, 0.4), (0.18, 0.4)], "fg"),
        ("poly", [(0.5, 0.2), (0.92, 0.68), (0.08, 0.68)], "fg"),
    ],
    "key": [
        ("ellipse", (0.03, 0.28, 0.45, 0.72), "fg"),
        ("ellipse", (0.14, 0.39, 0.34, 0.61), "bg"),
        ("rect", (0.42, 0.44, 0.97, 0.56), "fg"),
        ("rect", (0.72, 0.56, 0.8, 0.72), "fg"),
        ("rect", (0.87, 0.56, 0.95, 0.68), "fg"),
    ],
    "arrow": [
        ("rect", (0.05, 0.4, 0.58, 0.6), "fg"),
        ("poly", [(0.52, 0.14), (0.96, 0.5), (0.52, 0.86)], "fg"),
    ],
    "bell": [
        ("ellipse", (0.44, 0.03, 0.56, 0.15), "fg"),
        ("ellipse", (0.27, 0.1, 0.73, 0.5), "fg"),
        ("poly", [(0.27, 0.32), (0.73, 0.32), (0.86, 0.78), (0.14, 0.78)], "fg"),
        ("rect", (0.08, 0.74, 0.92, 0.83), "fg"),
        ("ellipse", (0.41, 0.8, 0.59, 0.97), "fg"),
    ],
    "fish": [
        ("poly", [(0.64, 0.5), (0.97, 0.2), (0.97, 0.8)], "fg"),
        ("ellipse", (0.03, 0.26, 0.74, 0.74), "fg"),
        ("ellipse", (0.16, 0.39, 0.27, 0.5), "bg"),  # eye
    ],
    "cup": [
        ("ellipse", (0.56, 0.32, 0.94, 0.72), "fg"),  # handle: a ring, half hidden by the body
        ("ellipse", (0.66, 0.42, 0.84, 0.62), "bg"),
        ("poly", [(0.08, 0.2), (0.72, 0.2), (0.64, 0.92), (0.16, 0.92)], "fg"),
    ],
    "umbrella": [
        ("pieslice", (0.03, 0.08, 0.97, 0.92), 180, 360, "fg"),
        ("rect", (0.46, 0.48, 0.54, 0.84), "fg"),
        ("arc", (0.3, 0.72, 0.54, 0.96), 0, 180, 0.08, "fg"),
    ],
}


def square_in(box: Box) -> Box:
    """The largest square centred in `box`."""
    x1, y1, x2, y2 = box
    s = min(x2 - x1, y2 - y1)
    ox, oy = x1 + (x2 - x1 - s) // 2, y1 + (y2 - y1 - s) // 2
    return ox, oy, ox + s, oy + s


def draw_prims(draw: ImageDraw.ImageDraw, prims: list[tuple], box: Box, fg: RGB, bg: RGB) -> None:
    """Draw unit-square primitives scaled into the square centred in `box`."""
    x1, y1, x2, _ = square_in(box)
    s = x2 - x1 - 1  # PIL boxes are inclusive

    def pt(u: float, v: float) -> tuple[float, float]:
        return x1 + u * s, y1 + v * s

    def rect(r: tuple) -> list[tuple[float, float]]:
        return [pt(r[0], r[1]), pt(r[2], r[3])]

    for p in prims:
        kind, colour = p[0], fg if p[-1] == "fg" else bg
        if kind == "rect":
            draw.rectangle(rect(p[1]), fill=colour)
        elif kind == "ellipse":
            draw.ellipse(rect(p[1]), fill=colour)
        elif kind == "poly":
            draw.polygon([pt(u, v) for u, v in p[1]], fill=colour)
        elif kind == "pieslice":
            draw.pieslice(rect(p[1]), p[2], p[3], fill=colour)
        elif kind == "arc":
            draw.arc(rect(p[1]), p[2], p[3], fill=colour, width=max(1, round(p[4] * s)))
        else:  # pragma: no cover - the tables above are fixed
            raise ValueError(f"unknown primitive {kind!r}")


# ----------------------------------------------------------------------------- textures


def texture_mask(name: str, h: int, w: int) -> np.ndarray:
    """Boolean ink mask of a texture over an h x w swatch; the period scales with the swatch."""
    p = max(4, round(min(h, w) / 5))
    yy, xx = np.mgrid[0:h, 0:w]
    if name == "stripes":
        return ((xx + yy) % p) < p / 2
    if name == "dots":
        dx, dy = xx % p - (p - 1) / 2, yy % p - (p - 1) / 2
        return dx * dx + dy * dy <= (0.3 * p) ** 2
    if name == "checker":
        c = max(2, p // 2)
        return ((xx // c + yy // c) % 2) == 0
    if name == "grid":
        lw = max(1, round(0.22 * p))
        return ((xx % p) < lw) | ((yy % p) < lw)
    if name == "zigzag":
        return ((yy + np.abs((xx % p) - p / 2)) % p) < 0.4 * p
    if name == "solid":
        return np.ones((h, w), dtype=bool)
    raise ValueError(f"unknown texture {name!r}")


def paint_mask(image: Image.Image, box: Box, mask: np.ndarray, colour: RGB) -> None:
    x1, y1 = box[0], box[1]
    image.paste(colour, (x1, y1, x1 + mask.shape[1], y1 + mask.shape[0]), Image.fromarray(mask.astype(np.uint8) * 255))


# ----------------------------------------------------------------------------- text


@lru_cache(maxsize=256)
def font(size: int) -> ImageFont.FreeTypeFont:
    """PIL's embedded default font at `size` px (no font files needed)."""
    return ImageFont.load_default(size=max(4, size))


def fit_font_size(text: str, w: int, h: int) -> int:
    """The largest font size whose ink box of `text` fits in w x h."""
    size = max(4, h)
    for _ in range(40):
        x1, y1, x2, y2 = font(size).getbbox(text)
        if x2 - x1 <= w and y2 - y1 <= h:
            return size
        size = max(4, min(size - 1, int(size * min(w / max(1, x2 - x1), h / max(1, y2 - y1)))))
    return size


def draw_text(draw: ImageDraw.ImageDraw, box: Box, text: str, colour: RGB) -> int:
    """Draw `text` as large as fits, its ink box centred in `box`; return the font size."""
    x1, y1, x2, y2 = box
    size = fit_font_size(text, x2 - x1, y2 - y1)
    f = font(size)
    bx1, by1, bx2, by2 = f.getbbox(text)
    x = x1 + (x2 - x1 - (bx2 - bx1)) // 2 - bx1
    y = y1 + (y2 - y1 - (by2 - by1)) // 2 - by1
    draw.text((x, y), text, fill=colour, font=f)
    return size


# ----------------------------------------------------------------------------- dot groups


def dot_layout(count: int, box: Box, seed: int) -> list[tuple[float, float, float]]:
    """`count` non-touching dots (cx, cy, r) on a jittered 3x3 grid over the square in `box`."""
    if not 1 <= count <= 9:
        raise ValueError(f"dot count must be 1..9, got {count}")
    rng = np.random.default_rng(seed)
    x1, y1, x2, _ = square_in(box)
    cell = (x2 - x1) / 3
    r = 0.3 * cell
    jitter = max(0.0, min(0.1 * cell, (cell - 2 * r - 3) / 2))  # keep >= 3 px between dots
    cells = rng.choice(9, size=count, replace=False)
    offsets = rng.uniform(-jitter, jitter, size=(count, 2))
    return [
        (x1 + (c % 3 + 0.5) * cell + dx, y1 + (c // 3 + 0.5) * cell + dy, r)
        for c, (dx, dy) in zip(cells.tolist(), offsets.tolist())
    ]


def draw_dots(draw: ImageDraw.ImageDraw, box: Box, count: int, colour: RGB, seed: int) -> None:
    for cx, cy, r in dot_layout(count, box, seed):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
