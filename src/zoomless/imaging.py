"""Safe image loading, bounding-box geometry and the views derived from a sample.

Boxes are `(x1, y1, x2, y2)` in pixels with x2/y2 exclusive, so `image.crop(box)` and numpy slicing
`a[y1:y2, x1:x2]` agree. Every view is a pure function: it returns a new image and never changes
its input.

Views of a sample (`render_view`):
    full     the image as is, the question as is
    crop     the evidence box plus a margin, at native resolution
    zoom     the crop enlarged (LANCZOS)
    overlay  the full image with a red outline around the box, plus a sentence that points at it
    teacher  the sample's explicit teacher image, else the zoom view
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from zoomless.sample import Box, ImageRef, Sample


class ImageError(ValueError):
    """An image that cannot be used; the one-line message names the file, "<bytes>" or the sample id."""


DEFAULT_PIXEL_CAP = 100_000_000

# ----------------------------------------------------------------------------- loading


def _fail(name: str, what: str) -> ImageError:
    return ImageError(f"{name}: {' '.join(str(what).split())}")  # always one line


@contextmanager
def _no_bomb_warning() -> Iterator[None]:
    # load_image applies its own cap; PIL's warning between its two limits is only noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _open(ref: ImageRef | Path, name: str) -> Image.Image:
    """Open lazily (header only); raise ImageError for missing, empty or unrecognised input."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        data = bytes(ref)
        if not data:
            raise _fail(name, "empty image bytes")
        source: io.BytesIO | str = io.BytesIO(data)
    else:
        path = str(ref)
        where = "" if name == path else f" {path}"
        if not os.path.exists(path):
            raise _fail(name, f"no such file{where}")
        if os.path.isdir(path):
            raise _fail(name, f"is a directory, not an image{where}")
        if os.path.getsize(path) == 0:
            raise _fail(name, f"empty file (0 bytes){where}")
        source = path
    try:
        with _no_bomb_warning():
            return Image.open(source)
    except Image.DecompressionBombError as e:
        raise _fail(name, f"too large to decode safely ({e})") from None
    except Image.UnidentifiedImageError:
        raise _fail(name, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _fail(name, f"cannot read image header ({e})") from None


def _exif_upright(im: Image.Image) -> Image.Image:
    # A broken EXIF block does not make the pixels unusable: keep the stored orientation then.
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - PIL raises many types for malformed EXIF
        return im.copy()


def _white_background(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit gray to 8-bit by scaling the value range (clipping would turn most of it white).

    I;16*: the full 16-bit range maps onto 0..255 (v / 257), so absolute brightness is kept.
    I (32-bit int): 0..255 data is kept as is, 0..65535 data is treated as 16-bit (how 16-bit files
    usually arrive in this mode), anything else is stretched from its min..max.
    F (float): 0..1 data is scaled by 255, anything else is stretched from its min..max.
    """
    a = np.asarray(im, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I;16"):
        a = a / 257.0
    elif im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif im.mode == "I" and lo >= 0.0 and hi <= 255.0:
        pass
    elif im.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))
    gray = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_depth_to_rgb(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return _white_background(im.convert("RGBA"))
    return im.convert("RGB")  # RGB (copy), P, L, 1, CMYK, YCbCr, ...


def load_image(
    ref: ImageRef | Path | Image.Image,
    max_pixels: int = DEFAULT_PIXEL_CAP,
    name: str | None = None,
) -> Image.Image:
    """Load a path, encoded bytes or PIL image into a fully decoded, upright RGB image.

    The size is checked against `max_pixels` from the header, before any pixel is decoded. Every
    failure (missing, empty, truncated, corrupt, not an image, too large) raises ImageError with a
    one-line message `"{name}: what is wrong"`; `name` defaults to the path, "<bytes>" or "<image>".
    Note that PIL's own bomb limit (2 * Image.MAX_IMAGE_PIXELS) still applies above our cap.
    """
    if isinstance(ref, Image.Image):
        name = name or "<image>"
        im = ref
    else:
        if name is None:
            name = "<bytes>" if isinstance(ref, (bytes, bytearray, memoryview)) else str(ref)
        im = _open(ref, name)
    try:
        w, h = im.size
        if w * h > max_pixels:
            raise _fail(name, f"image is {w}x{h} = {w * h:,} pixels, over the cap of {max_pixels:,}")
        if w == 0 or h == 0:
            raise _fail(name, f"image has no pixels ({w}x{h})")
        with _no_bomb_warning():
            im.load()
        out = _to_rgb(_exif_upright(im))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise _fail(name, f"too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
        raise _fail(name, f"corrupt or truncated image ({e})") from None
    finally:
        if im is not ref:
            im.close()
    return out


# ----------------------------------------------------------------------------- box geometry


def clamp_box(box, width: int, height: int) -> Box:
    """Round to the nearest ints and clamp inside a width x height image, keeping at least 1 px."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1 = min(max(x1, 0), width - 1)
    y1 = min(max(y1, 0), height - 1)
    x2 = min(max(x2, x1 + 1), width)
    y2 = min(max(y2, y1 + 1), height)
    return (x1, y1, x2, y2)


def expand_box(box, margin: float, width: int, height: int) -> Box:
    """Grow by `margin` times the box width/height on each side (edges round outwards), clamped."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    eps = 1e-6  # so 10.0000001 does not round outwards to 11
    grown = (
        math.floor(x1 - dx + eps),
        math.floor(y1 - dy + eps),
        math.ceil(x2 + dx - eps),
        math.ceil(y2 + dy - eps),
    )
    return clamp_box(grown, width, height)


def box_area_fraction(box, width: int, height: int) -> float:
    """The fraction of the image that the box covers (only the part of the box inside the image)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    iw = max(0.0, min(x2, width) - max(x1, 0.0))
    ih = max(0.0, min(y2, height) - max(y1, 0.0))
    return iw * ih / float(width * height)


def scale_box(box, sx: float, sy: float) -> Box:
    """Multiply x by sx and y by sy, rounded to ints, keeping at least 1 px (no clamping)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    nx1, ny1 = int(round(x1 * sx)), int(round(y1 * sy))
    return (nx1, ny1, max(int(round(x2 * sx)), nx1 + 1), max(int(round(y2 * sy)), ny1 + 1))


def to_rel1000(box, width: int, height: int) -> Box:
    """Pixel xyxy to 0..1000 relative ints (the Qwen3-VL grounding convention)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    rel = (x1 / width, y1 / height, x2 / width, y2 / height)
    return tuple(min(max(int(round(r * 1000)), 0), 1000) for r in rel)  # type: ignore[return-value]


def from_rel1000(box, width: int, height: int) -> Box:
    """0..1000 relative xyxy back to pixels, clamped to the image (exact round trip when sides < 1000 px)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return clamp_box(
        (x1 * width / 1000, y1 * height / 1000, x2 * width / 1000, y2 * height / 1000), width, height
    )


def check_box(box, width: int, height: int, name: str) -> Box:
    """Return the box as ints, or raise ImageError if it is malformed, empty or not inside the image."""
    try:
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    except (TypeError, ValueError):
        raise _fail(name, f"box {box!r} is not four numbers") from None
    shown = f"[{x1}, {y1}, {x2}, {y2}]"
    if x2 <= x1 or y2 <= y1:
        raise _fail(name, f"box {shown} is empty")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise _fail(name, f"box {shown} lies outside the {width}x{height} image")
    return (x1, y1, x2, y2)


# ----------------------------------------------------------------------------- views


def _grow_to(lo: int, hi: int, min_side: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) to min_side around its centre, shifted (not shrunk) to stay inside [0, limit)."""
    if hi - lo >= min_side:
        return lo, hi
    side = min(min_side, limit)
    lo = (lo + hi - side) // 2
    lo = min(max(lo, 0), limit - side)
    return lo, lo + side


def crop_view(image: Image.Image, box, margin: float = 0.25, min_side: int = 28) -> tuple[Image.Image, Box]:
    """Crop the box plus `margin` (fraction of box size, each side), at least min_side x min_side.

    Returns the crop and the crop rectangle in original pixels.
    """
    w, h = image.size
    x1, y1, x2, y2 = expand_box(box, margin, w, h)
    x1, x2 = _grow_to(x1, x2, min_side, w)
    y1, y2 = _grow_to(y1, y2, min_side, h)
    rect = (x1, y1, x2, y2)
    return image.crop(rect), rect


def zoom_view(image: Image.Image, factor: float = 2.0, size: tuple[int, int] | None = None) -> Image.Image:
    """Enlarge by `factor` (or to an exact `size`) with LANCZOS."""
    if size is None:
        if factor <= 0:
            raise ValueError(f"zoom factor must be > 0, got {factor}")
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.LANCZOS)


def overlay_view(
    image: Image.Image, box, margin: float = 0.05, width: int = 5, color=(255, 0, 0)
) -> Image.Image:
    """A copy with a rectangle outline around the box expanded by `margin` (the ZwZ overlay).

    As with PIL (and the ZwZ data), the `width` px of outline lie inside the expanded rectangle.
    """
    out = image.convert("RGB")  # a copy, also for RGB input
    x1, y1, x2, y2 = expand_box(box, margin, out.width, out.height)
    ImageDraw.Draw(out).rectangle((x1, y1, x2 - 1, y2 - 1), outline=color, width=width)
    return out


POINTING_SENTENCE = "Only focus on the objects inside the red bounding box in the image to answer this question."


def with_pointing_sentence(question: str) -> str:
    return question + "\n\n" + POINTING_SENTENCE


def budget_size(width: int, height: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """The size resize_to_budget picks: scale down to fit, then round each side DOWN to a multiple
    of `factor` (at least `factor`). Rounding down keeps w*h <= max_pixels and never enlarges a side
    that is already >= factor."""
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels={max_pixels} is below one {factor}x{factor} patch")
    s = min(1.0, math.sqrt(max_pixels / (width * height)))
    return (
        max(factor, int(width * s) // factor * factor),
        max(factor, int(height * s) // factor * factor),
    )


def resize_to_budget(
    image: Image.Image, box: Box | None, max_pixels: int, factor: int = 28
) -> tuple[Image.Image, Box | None]:
    """Downscale so w*h <= max_pixels with sides on multiples of `factor`; rescale the box with it.

    What this chooses: the result always has aligned sides, so a Qwen-VL processor with the same
    factor (patch 14 x merge 2 = 28) and a max_pixels >= ours does not resize it again and the box
    stays exact (EasyR1's silent resize desynced boxes). Images within budget but not aligned are
    therefore shrunk slightly (< factor px per side). Sides shorter than `factor` grow to `factor`,
    the only case that enlarges. An image already within budget and aligned is returned as is
    (the same object). factor=1 means "only fit the budget".
    """
    w, h = image.size
    nw, nh = budget_size(w, h, max_pixels, factor)
    if (nw, nh) == (w, h):
        return image, box
    out = image.resize((nw, nh), Image.Resampling.LANCZOS)
    if box is not None:
        box = clamp_box(scale_box(box, nw / w, nh / h), nw, nh)
    return out, box


VIEWS = ("full", "crop", "zoom", "overlay", "teacher")


def render_view(
    sample: Sample,
    view: str,
    image: Image.Image | None = None,
    *,
    crop_margin: float = 0.25,
    zoom: float = 2.0,
    max_pixels: int | None = None,
) -> tuple[Image.Image, str]:
    """The (image, question text) a model sees for one view of a sample.

    `image` is the already-loaded full image, if the caller has it. The overlay is drawn after the
    budget resize, so its 5 px outline is what the model sees; every other view is resized last.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    question = sample.question
    if view == "teacher" and sample.teacher_image is not None:
        out = load_image(sample.teacher_image, name=f"{sample.id} (teacher_image)")
        return _fit(out, max_pixels), question

    if view != "full" and sample.box is None:
        raise _fail(sample.id, f"the {view!r} view needs a box and the sample has none")
    if image is None:
        full = load_image(sample.image, name=sample.id)
    elif image.mode != "RGB":
        full = load_image(image, name=sample.id)
    else:
        full = image
    if view == "full":
        return _fit(full, max_pixels), question

    box = check_box(sample.box, full.width, full.height, sample.id)
    if view == "overlay":
        if max_pixels is not None:
            full, box = resize_to_budget(full, box, max_pixels)
        return overlay_view(full, box), with_pointing_sentence(question)

    crop, _ = crop_view(full, box, margin=crop_margin)
    if view in ("zoom", "teacher"):
        crop = zoom_view(crop, zoom)
    return _fit(crop, max_pixels), question


def _fit(image: Image.Image, max_pixels: int | None) -> Image.Image:
    return image if max_pixels is None else resize_to_budget(image, None, max_pixels)[0]
