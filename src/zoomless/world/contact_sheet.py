"""A contact sheet: thumbnails with the evidence box drawn, the evidence crop, question and answer."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageOps

from zoomless.imaging import load_image
from zoomless.sample import Sample
from zoomless.world.draw import font

PAD = 8  # around each cell
CAPTION_LINES = 4
LINE_H = 13


def cell_size(thumb: int, show_crops: bool) -> tuple[int, int]:
    """Width and height of one cell: thumbnail (+ crop) side by side, captions below."""
    return thumb * (2 if show_crops else 1) + PAD * (3 if show_crops else 2), thumb + CAPTION_LINES * LINE_H + 2 * PAD


def _thumbnail(image: Image.Image, box, thumb: int) -> Image.Image:
    scale = thumb / max(image.size)
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    if box is not None:
        x1, y1, x2, y2 = (round(v * scale) for v in box)
        ImageDraw.Draw(small).rectangle([x1 - 2, y1 - 2, x2 + 1, y2 + 1], outline=(255, 0, 0), width=2)
    return ImageOps.pad(small, (thumb, thumb), color=(255, 255, 255))


def _crop(image: Image.Image, box, thumb: int) -> Image.Image:
    region = image.crop(box) if box is not None else image
    return ImageOps.pad(region, (thumb, thumb), method=Image.NEAREST, color=(255, 255, 255))


def contact_sheet(
    samples: Sequence[Sample], out_png: str | Path, cols: int = 4, thumb: int = 256, show_crops: bool = True
) -> Path:
    """Write a grid of samples to `out_png`: full view with the box in red, the crop, captions."""
    if not samples:
        raise ValueError("contact_sheet needs at least one sample")
    cols = max(1, min(cols, len(samples)))
    rows = math.ceil(len(samples) / cols)
    cw, ch = cell_size(thumb, show_crops)
    sheet = Image.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    f = font(11)
    chars = max(10, int((cw - 2 * PAD) / 6))  # about 6 px per character at size 11
    for k, s in enumerate(samples):
        x, y = (k % cols) * cw + PAD, (k // cols) * ch + PAD
        image = load_image(s.image, name=f"sample {s.id}")
        sheet.paste(_thumbnail(image, s.box, thumb), (x, y))
        if show_crops:
            sheet.paste(_crop(image, s.box, thumb), (x + thumb + PAD, y))
        lines = textwrap.wrap(f"[{s.dimension}] {s.question}", chars)[: CAPTION_LINES - 1]
        lines.append(f"answer: {s.answer}")
        for j, line in enumerate(lines):
            draw.text((x, y + thumb + 2 + j * LINE_H), line, fill=(0, 0, 0), font=f)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
