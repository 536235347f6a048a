"""Stage 2, region proposal: where the small details are. Three backends, one filter.

- teacher: an MLLM lists the objects that appear exactly once and grounds each with a box
  (Qwen3-VL writes 0..1000 relative coordinates, Qwen2.5-VL absolute pixels of the image it saw).
- opencv: classical proposals from closed edge contours; needs no model.
- boxes:  a user's JSONL of boxes from any detector (SAM, GroundingDINO, annotations ...).

Boxes are always converted to original-image pixels, (x1, y1, x2, y2) with x2/y2 exclusive.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from zoomless.eval.grading import normalize
from zoomless.imaging import box_area_fraction, resize_to_budget
from zoomless.synth.config import OpenCVConfig, RegionsConfig, SynthError
from zoomless.synth.parsing import four_numbers, json_list


@dataclass(frozen=True)
class Proposal:
    box: tuple[int, int, int, int]  # original pixels
    label: str | None = None
    score: float | None = None


def pixel_box(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """Float pixels to ints, rounding outwards so the object is never cut."""
    x1, y1, x2, y2 = box
    return (math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2))


# ----------------------------------------------------------------------------- teacher backend

_COORDS_HINT = {
    "rel1000": "in relative coordinates from 0 to 1000 (0,0 is the top-left corner, 1000,1000 the bottom-right)",
    "rel1": "as fractions of the image width and height, from 0 to 1",
    "pixels": "in pixels of this {w}x{h} image",
}


def lister_image(image: Image.Image, coords: str, max_pixels: int, factor: int) -> Image.Image:
    """The image the lister sees. For pixel coordinates its sides are aligned to the model's patch
    grid and within budget, so the server does not resize it again and the pixels we map back
    are the pixels the model saw."""
    if coords != "pixels":
        return image
    return resize_to_budget(image, None, max_pixels, factor)[0]


def lister_prompt(coords: str, sent_size: tuple[int, int]) -> str:
    hint = _COORDS_HINT[coords].format(w=sent_size[0], h=sent_size[1])
    return (
        "Look at this image and list the distinct, clearly identifiable objects in it: people, animals, "
        "things, signs, labels, text.\n"
        "List only objects that appear exactly once in the image. Skip anything blurry or ambiguous, and "
        "do not guess at shapes you cannot name.\n"
        f"For each object give a short name and its bounding box [x1, y1, x2, y2] {hint}.\n"
        "Answer with a JSON list in a ```json block, for example:\n"
        '```json\n[{"label": "coffee cup", "bbox_2d": [x1, y1, x2, y2]}, '
        '{"label": "street sign", "bbox_2d": [x1, y1, x2, y2]}]\n```'
    )


def _to_pixels(box, coords: str, sent_size: tuple[int, int], size: tuple[int, int]):
    """A box in the lister's coordinates -> original pixels; None when it lies outside the frame."""
    w, h = size
    if coords == "rel1000":
        sx, sy, limit_x, limit_y = w / 1000, h / 1000, 1000, 1000
    elif coords == "rel1":
        sx, sy, limit_x, limit_y = w, h, 1, 1
    else:
        sx, sy, limit_x, limit_y = w / sent_size[0], h / sent_size[1], sent_size[0], sent_size[1]
    x1, y1, x2, y2 = box
    slack = 0.02  # a box a hair past the edge is clamped; one far outside means the wrong convention
    if min(x1, y1) < -slack * max(limit_x, limit_y) or x2 > limit_x * (1 + slack) or y2 > limit_y * (1 + slack):
        return None
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def parse_objects(
    text: str, coords: str, sent_size: tuple[int, int], size: tuple[int, int]
) -> tuple[list[Proposal], str | None]:
    """The objects a lister reply names, in original pixels, and the reason when it names none usable.

    Entries without a name (1 < len < 50 characters, not "none") or without four numbers are
    skipped; so are boxes outside the coordinate frame.
    """
    items = json_list(text)
    if items is None:
        return [], "no JSON list of objects in the reply"
    out = []
    for item in items:
        if not isinstance(item, dict):
            continue
        label = next((item[k] for k in ("label", "name", "object") if isinstance(item.get(k), str)), None)
        box = next((four_numbers(item[k]) for k in ("bbox_2d", "bbox", "box") if k in item), None)
        if label is None or box is None:
            continue
        label = " ".join(label.split()).strip(" ,.;:")
        if not 1 < len(label) < 50 or normalize(label) in ("", "none"):
            continue
        px = _to_pixels(box, coords, sent_size, size)
        if px is not None:  # nearest pixel: a 0..1000 box maps back exactly on images under 1000 px
            out.append(Proposal(tuple(int(round(v)) for v in px), label))
    if not out:
        return [], "no usable object in the list"
    return out, None


# ----------------------------------------------------------------------------- opencv backend


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def propose_opencv(
    image: Image.Image, cfg: OpenCVConfig, max_area_fraction: float, min_side: int = 1
) -> list[Proposal]:
    """Closed edge contours as candidate objects, best first.

    Edges (Canny, thresholds from the median grey level) are closed into blobs; each contour's
    bounding box is scored by how solidly the contour fills it and how much edge detail it holds,
    then non-maximum suppression keeps distinct boxes. Boxes the region filters would drop (too
    large, sides under `min_side` original px) are not proposed. Works on a copy at most `work_side`
    px long.
    """
    w, h = image.size
    s = min(1.0, cfg.work_side / max(w, h))
    small = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR) if s < 1 else image
    gray = cv2.cvtColor(np.asarray(small.convert("RGB")), cv2.COLOR_RGB2GRAY)
    med = float(np.median(gray))
    edges = cv2.Canny(gray, max(10.0, 0.66 * med), max(30.0, min(255.0, 1.33 * med)))
    closed = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    contours, _ = cv2.findContours(closed, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    sw, sh = gray.shape[1], gray.shape[0]
    integral = cv2.integral((edges > 0).astype(np.uint8))
    scored = []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        frac = bw * bh / (sw * sh)
        too_small = min(bw, bh) < max(4.0, min_side * s) or frac < cfg.min_area_fraction
        if too_small or frac >= max_area_fraction or max(bw / bh, bh / bw) > 6:
            continue
        fill = min(1.0, cv2.contourArea(c) / (bw * bh))
        edge_px = integral[y + bh, x + bw] - integral[y, x + bw] - integral[y + bh, x] + integral[y, x]
        detail = min(1.0, edge_px / (bw * bh) / 0.15)
        scored.append((0.5 * fill + 0.5 * detail, (x, y, x + bw, y + bh)))
    scored.sort(key=lambda t: (-t[0], t[1]))
    kept: list[tuple[int, int, int, int]] = []
    for _, b in scored:
        if all(_iou(b, k) < cfg.nms_iou for k in kept):
            kept.append(b)
        if len(kept) == cfg.top_k:
            break
    return [Proposal(pixel_box((x1 / s, y1 / s, x2 / s, y2 / s))) for x1, y1, x2, y2 in kept]


# ----------------------------------------------------------------------------- boxes backend


def load_boxes(path: Path) -> dict[Path, list[Proposal]]:
    """A JSONL of {"image": path, "box": [x1, y1, x2, y2], "label"?: str, "score"?: number} rows,
    boxes in original pixels; image paths relative to the file's folder. Bad rows raise SynthError
    naming the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise SynthError(f"regions.boxes_file: no such file: {path}")
    out: dict[Path, list[Proposal]] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SynthError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SynthError(f"{where}: each line must be a JSON object")
        image = row.get("image")
        if not isinstance(image, str) or not image:
            raise SynthError(f"{where}: 'image' must be a path")
        raw_box = row.get("box", row.get("bbox"))
        box = four_numbers(raw_box)
        if box is None:
            raise SynthError(f"{where}: 'box' must be four numbers [x1, y1, x2, y2], got {raw_box!r}")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise SynthError(f"{where}: 'box' {list(raw_box)} is empty (x2 <= x1 or y2 <= y1)")
        label, score = row.get("label"), row.get("score")
        if label is not None and not isinstance(label, str):
            raise SynthError(f"{where}: 'label' must be a string")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise SynthError(f"{where}: 'score' must be a number")
        p = Path(image)
        p = (p if p.is_absolute() else path.parent / p).resolve()
        out.setdefault(p, []).append(Proposal(pixel_box(box), label, None if score is None else float(score)))
    return out


# ----------------------------------------------------------------------------- filters


def filter_regions(
    proposals: list[Proposal], width: int, height: int, cfg: RegionsConfig
) -> tuple[list[Proposal], list[tuple[Proposal, str]]]:
    """Keep regions that are small, not tiny, unique and confident; say why each other one went."""
    labels = [normalize(p.label) for p in proposals if p.label]
    repeated = {lab for lab in labels if labels.count(lab) > 1}
    kept: list[Proposal] = []
    dropped: list[tuple[Proposal, str]] = []
    for p in proposals:
        x1, y1, x2, y2 = p.box
        box = (max(x1, 0), max(y1, 0), min(x2, width), min(y2, height))
        if box[2] <= box[0] or box[3] <= box[1]:
            reason = "box empty or outside the image"
        elif p.score is not None and p.score < cfg.min_score:
            reason = f"score under {cfg.min_score}"
        elif cfg.unique and p.label and normalize(p.label) in repeated:
            reason = "object not unique (label listed more than once)"
        elif box_area_fraction(box, width, height) >= cfg.max_area_fraction:
            reason = f"covers {cfg.max_area_fraction:.0%} of the image or more"
        elif min(box[2] - box[0], box[3] - box[1]) < cfg.min_side:
            reason = f"side under {cfg.min_side} px"
        elif any(k.box == box for k in kept):
            reason = "duplicate box"
        elif cfg.max_per_image is not None and len(kept) >= cfg.max_per_image:
            reason = "over max_per_image"
        else:
            kept.append(Proposal(box, p.label, p.score))
            continue
        dropped.append((p, reason))
    return kept, dropped
