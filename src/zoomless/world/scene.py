"""A ZoomWorld scene: a cluttered canvas with a few framed panels, one of which holds the evidence.

`plan_scene` draws every random choice from one seed (cheap, no pixels); `render_scene` turns the
plan into an image. Keeping the two apart lets a resumed run rebuild records without re-rendering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from zoomless.world import dimensions as dims
from zoomless.world.draw import Box


MIN_PANEL_SIDE = 28  # px: below this, dots merge and text blurs even in the crop


@dataclass(frozen=True)
class Panel:
    box: Box  # outer box, frame included, x2/y2 exclusive
    border: int  # frame width in pixels
    frame: str  # frame colour name: unique in the scene
    value: str  # what the panel shows, in the scene's dimension
    colour: str  # ink colour name of the content
    seed: int  # layout seed of the content (dot positions, shape of a colour swatch)

    @property
    def interior(self) -> Box:
        x1, y1, x2, y2 = self.box
        b = self.border
        return x1 + b, y1 + b, x2 - b, y2 - b

    @property
    def content_box(self) -> Box:
        x1, y1, x2, y2 = self.interior
        m = max(2, round(0.07 * min(x2 - x1, y2 - y1)))
        return x1 + m, y1 + m, x2 - m, y2 - m

    def to_meta(self) -> dict:
        return {"box": list(self.box), "border": self.border, "frame": self.frame, "value": self.value,
                "colour": self.colour, "seed": self.seed}


@dataclass(frozen=True)
class Scene:
    size: int
    dimension: str
    panels: tuple[Panel, ...]
    evidence: int  # index of the evidence panel in `panels`
    clutter_seed: int
    question: str
    answer: str
    options: tuple[str, ...]
    ocr: str = "strings"  # what text shows, in panels and clutter alike (dims.OCR_MODES)

    @property
    def evidence_panel(self) -> Panel:
        return self.panels[self.evidence]


# ----------------------------------------------------------------------------- planning


def _panel_size(rng: np.random.Generator, size: int, aspect: float, lo: float, hi: float) -> tuple[int, int]:
    """Width and height of a panel whose area fraction is uniform in [lo, hi] (kept in bounds after rounding)."""
    area = rng.uniform(lo, hi) * size * size
    w = max(8, round(math.sqrt(area * aspect)))
    h = max(8, round(area / w))
    total = size * size
    while w * h > hi * total and h > 8:
        h -= 1
    while w * h < lo * total:
        h += 1
    return w, h


def _place(rng: np.random.Generator, size: int, w: int, h: int, placed: list[Box], gap: int) -> Box | None:
    margin = max(2, size // 100)
    if w + 2 * margin > size or h + 2 * margin > size:
        return None
    for _ in range(400):
        x = int(rng.integers(margin, size - w - margin + 1))
        y = int(rng.integers(margin, size - h - margin + 1))
        if all(x + w + gap <= a or a2 + gap <= x or y + h + gap <= b or b2 + gap <= y for a, b, a2, b2 in placed):
            return x, y, x + w, y + h
    return None


def parse_panels(text: str) -> tuple[int, int]:
    """`plan_scene`'s `panels` from "N" or "LO-HI" (as command lines take it), e.g. "1" or "4-6"."""
    lo, _, hi = text.partition("-")
    if not (lo.isdigit() and (hi.isdigit() or not hi)):
        raise ValueError(f"--panels takes N or LO-HI, e.g. 1 or 4-6, got {text!r}")
    return int(lo), int(hi or lo)


def plan_scene(
    scene_seed: int,
    dimension: str,
    size: int = 1024,
    min_area_fraction: float = 0.005,
    max_area_fraction: float = 0.03,
    frame_fraction: float = 0.05,
    panels: tuple[int, int] = (4, 6),
    ocr: str = "strings",
) -> Scene:
    """Every random choice of one scene, drawn from `scene_seed`. A panel's frame is
    `frame_fraction` of its shorter side wide (at least 2 px); it changes no random choice.
    `panels` bounds how many framed panels the scene tries to place (the evidence and the
    distractor panels); `ocr` is "strings" (random characters) or "words" (dims.OCR_WORDS)."""
    if dimension not in dims.DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; choose from {list(dims.DIMENSIONS)}")
    if not 0 < min_area_fraction <= max_area_fraction <= 0.2:
        raise ValueError(
            f"area fractions must satisfy 0 < min <= max <= 0.2, got min={min_area_fraction} max={max_area_fraction}"
        )
    if math.sqrt(min_area_fraction) * size < MIN_PANEL_SIDE:
        raise ValueError(
            f"panels of area fraction {min_area_fraction} in a {size}px scene are under {MIN_PANEL_SIDE}px wide, "
            "too small to draw their contents: raise size or min_area_fraction"
        )
    if not 0 < frame_fraction <= 0.3:
        raise ValueError(f"frame_fraction must be in (0, 0.3], got {frame_fraction}")
    if not 1 <= panels[0] <= panels[1] <= len(dims.FRAME_COLORS):
        raise ValueError(f"panels must be (lo, hi) with 1 <= lo <= hi <= {len(dims.FRAME_COLORS)} "
                         f"(one frame colour each), got {panels}")
    rng = np.random.default_rng(scene_seed)
    aspect = dims.ASPECT.get(dimension, 1.0)
    gap = max(4, round(0.015 * size))

    # Boxes first (the evidence panel is placed first, so it always fits), then values.
    want = int(rng.integers(panels[0], panels[1] + 1))
    boxes: list[Box] = []
    for _ in range(want):
        box = _place(rng, size, *_panel_size(rng, size, aspect, min_area_fraction, max_area_fraction), boxes, gap)
        if box is None and not boxes:
            raise ValueError(f"a panel of area fraction {max_area_fraction} does not fit in a {size}px scene")
        if box is not None:
            boxes.append(box)
    n = len(boxes)
    values = dims.distinct_values(dimension, n, rng, ocr)
    frames = rng.choice(list(dims.FRAME_COLORS), size=n, replace=False).tolist()
    panels = []
    for box, frame, value in zip(boxes, frames, values):
        border = max(2, round(frame_fraction * min(box[2] - box[0], box[3] - box[1])))
        colour = dims.ink_colour(dimension, value, rng)
        panels.append(Panel(box, border, frame, value, colour, int(rng.integers(0, 2**31))))

    # The evidence is panel 0; options are its value and values shown in other panels (so every
    # option is visible somewhere and only the referred panel settles the answer).
    answer = values[0]
    others = values[1:4]
    pool = dims.value_pool(dimension, ocr)
    while len(others) < 3:
        extra = dims.random_string(rng) if pool is None else str(rng.choice(list(pool)))
        if extra != answer and extra not in others:
            others.append(extra)
    options = [answer, *others]
    options = [options[i] for i in rng.permutation(4)]
    template = dims.QUESTIONS[dimension][int(rng.integers(len(dims.QUESTIONS[dimension])))]
    question = template.format(ref=dims.reference(frames[0]))
    return Scene(size, dimension, tuple(panels), 0, int(rng.integers(0, 2**31)), question, answer, tuple(options), ocr)


# ----------------------------------------------------------------------------- rendering


def _random_colour(rng: np.random.Generator, lo: int = 30, hi: int = 226) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour gradient in a random direction with grey noise, in 4 px blocks (cheap to draw and compress)."""
    block = 4
    nb = -(-size // block)
    c0, c1 = rng.integers(60, 210, (2, 3)).astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    g = np.linspace(0, 1, nb, dtype=np.float32)
    t = (np.cos(a) * g[None, :] + np.sin(a) * g[:, None] + 1.5) / 3.0
    small = c0 * (1 - t[..., None]) + c1 * t[..., None] + rng.integers(-10, 11, (nb, nb, 1))
    small = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))
    return small.resize((nb * block, nb * block), Image.NEAREST).crop((0, 0, size, size))


def _clutter(rng: np.random.Generator, size: int, ocr: str = "strings") -> Image.Image:
    """Background with translucent shapes, lines, small blobs and loose unframed distractor items."""
    img = _background(rng, size)
    scale = (size / 1024) ** 2
    od = ImageDraw.Draw(img, "RGBA")  # blends translucent fills into the RGB image
    for _ in range(int(rng.integers(20, 40) * scale) + 4):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(size // 40, size // 4, 2)
        fill = (*_random_colour(rng), int(rng.integers(60, 160)))
        kind = int(rng.integers(3))
        if kind == 0:
            od.ellipse([x, y, x + w, y + h], fill=fill)
        elif kind == 1:
            od.rectangle([x, y, x + w, y + h], fill=fill)
        else:
            pts = rng.integers(-w, w, (int(rng.integers(3, 6)), 2)) + np.array([x, y])
            od.polygon([tuple(p) for p in pts.tolist()], fill=fill)

    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(15, 35) * scale) + 3):
        x1, y1, x2, y2 = rng.integers(0, size, 4).tolist()
        draw.line([x1, y1, x2, y2], fill=_random_colour(rng), width=int(rng.integers(1, 5)))
    for _ in range(int(rng.integers(120, 260) * scale) + 10):
        x, y = rng.integers(0, size, 2).tolist()
        r = int(rng.integers(1, 5))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=_random_colour(rng, 0, 256))

    # Loose distractors of every kind, unframed, so that what the panels show is not rare in the image.
    for _ in range(int(rng.integers(8, 16) * scale) + 2):
        dim = dims.DIMENSIONS[int(rng.integers(len(dims.DIMENSIONS)))]
        value = dims.distinct_values(dim, 1, rng, ocr)[0]
        colour = dims.ink_colour(dim, value, rng)
        side = int(rng.uniform(0.025, 0.08) * size)
        w = int(side * dims.ASPECT.get(dim, 1.0))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - side))
        hole = _random_colour(rng, 150, 256)
        dims.draw_content(img, (x, y, x + w, y + side), dim, value, colour, int(rng.integers(0, 2**31)), hole)
    return img


def draw_panel(image: Image.Image, panel: Panel, dimension: str) -> None:
    """A frame in the panel's colour, a plain fill, and the content filling most of the interior."""
    draw = ImageDraw.Draw(image)
    x1, y1, x2, y2 = panel.box
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=dims.COLORS[panel.frame])
    ix1, iy1, ix2, iy2 = panel.interior
    draw.rectangle([ix1, iy1, ix2 - 1, iy2 - 1], fill=dims.PANEL_FILL)
    dims.draw_content(image, panel.content_box, dimension, panel.value, panel.colour, panel.seed)


def render_scene(scene: Scene, panels: int | None = None) -> Image.Image:
    """The RGB image of a planned scene; with `panels`, only the first that many panels are drawn
    (the evidence is panel 0), which makes easier full views for a distractor curriculum."""
    return render_scene_variants(scene, [panels])[panels]


def render_scene_variants(scene: Scene, counts: list[int | None]) -> dict[int | None, Image.Image]:
    """`render_scene(scene, k)` for every k in `counts`, drawing the clutter once and the panels
    one after another (fewest first)."""
    img = _clutter(np.random.default_rng(scene.clutter_seed), scene.size, scene.ocr)
    out, drawn = {}, 0
    for k in sorted(set(counts), key=lambda c: len(scene.panels) if c is None else c):
        stop = len(scene.panels) if k is None else min(k, len(scene.panels))
        for panel in scene.panels[drawn:stop]:
            draw_panel(img, panel, scene.dimension)
        drawn = max(drawn, stop)
        out[k] = img.copy()
    return out
