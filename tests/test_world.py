"""ZoomWorld: determinism, geometry, balance, and that every panel shows what its record says."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from zoomless.sample import read_samples
from zoomless.world import (
    COLORS,
    DIMENSIONS,
    PANEL_FILL,
    contact_sheet,
    draw_content,
    generate_sample,
    generate_split,
    plan_sample,
    value_pool,
)
from zoomless.world import generate as gen
from zoomless.world.contact_sheet import cell_size
from zoomless.world.dimensions import OCR_ALPHABET, OCR_WORDS
from zoomless.world.scene import Panel

SMALL = 400  # scene side for tests that do not look at contents (the smallest that fits 0.5% panels)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _ink(region: np.ndarray) -> np.ndarray:
    """Pixels that are not the plain panel fill."""
    return np.any(region != np.array(PANEL_FILL, dtype=np.uint8), axis=-1)


def _interior(image: np.ndarray, panel: dict) -> np.ndarray:
    x1, y1, x2, y2 = panel["box"]
    b = panel["border"]
    return image[y1 + b : y2 - b, x1 + b : x2 - b]


def _redraw(panel: dict, dimension: str, value: str) -> np.ndarray:
    """The panel's interior drawn alone on the plain fill, showing `value` instead."""
    p = Panel(tuple(panel["box"]), panel["border"], panel["frame"], value, panel["colour"], panel["seed"])
    x1, y1, x2, y2 = p.interior
    canvas = Image.new("RGB", (x2, y2), PANEL_FILL)
    draw_content(canvas, p.content_box, dimension, value, p.colour, p.seed)
    return np.asarray(canvas)[y1:y2, x1:x2]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# ----------------------------------------------------------------------------- determinism and splits


def test_same_seed_same_bytes_and_record():
    im1, s1 = generate_sample(7, split="train", seed=3, size=SMALL)
    im2, s2 = generate_sample(7, split="train", seed=3, size=SMALL)
    assert _png_bytes(im1) == _png_bytes(im2)
    assert s1 == s2


def test_splits_and_seeds_give_different_scenes():
    _, a = plan_sample(0, split="train")
    _, b = plan_sample(0, split="test")
    _, c = plan_sample(0, split="train", seed=1)
    assert a.id != b.id and a.id.startswith("train") and b.id.startswith("test")
    assert len({a.meta["scene_seed"], b.meta["scene_seed"], c.meta["scene_seed"]}) == 3
    assert a.box != b.box != c.box


def test_no_duplicate_images_across_splits(tmp_path):
    digests = Counter()
    for split in ("train", "val", "test"):
        path = generate_split(tmp_path / split, split, 6, size=SMALL, progress=False)
        for s in read_samples(path):
            digests[hashlib.sha256(Path(s.image).read_bytes()).hexdigest()] += 1
    assert len(digests) == 18 and max(digests.values()) == 1


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize("lo,hi", [(0.005, 0.03), (0.002, 0.004), (0.02, 0.05)])
def test_box_inside_image_and_area_in_bounds(lo, hi):
    for i in range(60):
        _, s = plan_sample(i, size=1024, min_area_fraction=lo, max_area_fraction=hi)
        x1, y1, x2, y2 = s.box
        assert 0 <= x1 < x2 <= 1024 and 0 <= y1 < y2 <= 1024
        assert lo <= (x2 - x1) * (y2 - y1) / 1024**2 <= hi
        assert s.meta["area_fraction"] == pytest.approx((x2 - x1) * (y2 - y1) / 1024**2, abs=1e-6)


def test_dimensions_balanced_and_subset():
    dims = Counter(plan_sample(i)[1].dimension for i in range(36))
    assert set(dims) == set(DIMENSIONS) and set(dims.values()) == {6}
    assert DIMENSIONS == ("counting", "ocr", "color", "structure", "material", "object")
    subset = Counter(plan_sample(i, dimensions=("ocr", "color"))[1].dimension for i in range(10))
    assert subset == {"ocr": 5, "color": 5}


def test_options_hold_answer_and_values_from_other_panels():
    for i in range(60):
        _, s = plan_sample(i)
        assert len(s.options) == 4 and len(set(s.options)) == 4 and s.answer in s.options
        panels = s.meta["panels"]
        assert panels[s.meta["evidence_panel"]]["value"] == s.answer
        others = {p["value"] for j, p in enumerate(panels) if j != s.meta["evidence_panel"]}
        assert s.answer not in others  # distractor panels show other values
        assert set(s.options) - {s.answer} <= others | set(value_pool(s.dimension) or s.options)
    # option order is shuffled, not always answer-first
    assert len({plan_sample(i)[1].options.index(plan_sample(i)[1].answer) for i in range(30)}) > 1


def test_question_names_exactly_one_panel():
    for i in range(60):
        _, s = plan_sample(i)
        panels = s.meta["panels"]
        frames = [p["frame"] for p in panels]
        assert len(frames) == len(set(frames)) >= 4
        named = [f for f in frames if f"the {f} border" in s.question]
        assert named == [s.meta["frame"]] == [panels[s.meta["evidence_panel"]]["frame"]]
        assert list(s.box) == panels[s.meta["evidence_panel"]]["box"]
        boxes = [p["box"] for p in panels]  # panels never overlap
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = boxes[a], boxes[b]
                assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1


def test_ocr_strings_avoid_lookalike_characters():
    for i in range(1, 120, 6):
        _, s = plan_sample(i)
        assert s.dimension == "ocr"
        for p in s.meta["panels"]:
            assert 3 <= len(p["value"]) <= 4 and set(p["value"]) <= set(OCR_ALPHABET)
    assert not set("0O1IlSZ8B") & set(OCR_ALPHABET)


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="unknown dimension 'smell'"):
        plan_sample(0, dimensions=("smell",))
    with pytest.raises(ValueError, match="area fractions"):
        plan_sample(0, min_area_fraction=0.05, max_area_fraction=0.01)
    with pytest.raises(ValueError, match="raise size or min_area_fraction"):
        plan_sample(0, size=256)
    with pytest.raises(ValueError, match="plain name"):
        plan_sample(0, split="../train")
    with pytest.raises(ValueError, match="frame_fraction"):
        plan_sample(0, frame_fraction=0.5)
    with pytest.raises(ValueError, match="panels must be"):
        plan_sample(0, panels=(0, 2))
    with pytest.raises(ValueError, match="unknown ocr mode 'glyphs'"):
        plan_sample(1, ocr="glyphs")


def test_lone_panel_world_with_ocr_words():
    """panels=(1, 1): the evidence panel is the only framed one (the clutter still holds loose
    values of every kind); ocr="words": text panels and loose text show words of OCR_WORDS."""
    for i in range(12):
        scene, s = plan_sample(i, size=224, min_area_fraction=0.03, max_area_fraction=0.06, panels=(1, 1), ocr="words")
        assert len(scene.panels) == 1 and s.meta["ocr"] == "words"
        assert s.answer in s.options and len(set(s.options)) == 4
        if s.dimension == "ocr":
            assert s.answer in OCR_WORDS and set(s.options) <= set(OCR_WORDS)
    default, _ = plan_sample(1, size=224, min_area_fraction=0.03, max_area_fraction=0.06)
    assert 4 <= len(default.panels) <= 6 and default.answer not in OCR_WORDS
    assert all(set(w) <= set(OCR_ALPHABET) for w in OCR_WORDS)


def test_frame_width_changes_nothing_else():
    """A thicker frame (`frame_fraction`) is the same scene: same boxes, values, question."""
    thin, _ = plan_sample(7, size=224, min_area_fraction=0.03, max_area_fraction=0.06)
    thick, _ = plan_sample(7, size=224, min_area_fraction=0.03, max_area_fraction=0.06, frame_fraction=0.15)
    assert [p.box for p in thin.panels] == [p.box for p in thick.panels]
    assert (thin.question, thin.answer, thin.options) == (thick.question, thick.answer, thick.options)
    for a, b in zip(thin.panels, thick.panels):
        side = min(a.box[2] - a.box[0], a.box[3] - a.box[1])
        assert a.border == max(2, round(0.05 * side)) and b.border == max(2, round(0.15 * side)) > a.border


# ----------------------------------------------------------------------------- the evidence is there


@pytest.fixture(scope="module")
def rendered():
    return [generate_sample(i, size=1024) for i in range(18)]  # three scenes per dimension


def test_frame_is_drawn_in_its_colour(rendered):
    for image, s in rendered:
        a = np.asarray(image)
        for p in s.meta["panels"]:
            x1, y1, x2, y2 = p["box"]
            ring = np.ones((y2 - y1, x2 - x1), dtype=bool)
            ring[p["border"] : -p["border"], p["border"] : -p["border"]] = False
            assert (a[y1:y2, x1:x2][ring] == COLORS[p["frame"]]).all()


def test_every_panel_shows_its_value(rendered):
    """Counting by connected components, colour by the dominant ink, the rest by redrawing every
    candidate value: the recorded one matches exactly, every other one is far off."""
    for image, s in rendered:
        a = np.asarray(image)
        for p in s.meta["panels"]:
            region = _interior(a, p)
            ink = _ink(region)
            assert ink.any() and not ink.all()
            if s.dimension == "counting":
                n_labels, _ = cv2.connectedComponents(ink.astype(np.uint8), connectivity=4)
                assert n_labels - 1 == int(p["value"]), s.id
            elif s.dimension == "color":
                colours, counts = np.unique(region[ink], axis=0, return_counts=True)
                assert tuple(colours[counts.argmax()]) == COLORS[p["value"]], s.id
            else:
                candidates = value_pool(s.dimension) or s.options
                if p["value"] not in candidates:  # an ocr distractor not among the options
                    candidates = (*candidates, p["value"])
                ious = {v: _iou(ink, _ink(_redraw(p, s.dimension, v))) for v in candidates}
                assert ious[p["value"]] == 1.0, s.id
                # circle vs hexagon is the closest pair (~0.90): told apart by corners, only up close
                assert max(iou for v, iou in ious.items() if v != p["value"]) < 0.95, (s.id, ious)


def test_contents_fill_most_of_the_panel(rendered):
    for image, s in rendered:
        if s.dimension == "counting":  # a single dot is small by design; dots span the panel's grid
            continue
        ev = s.meta["panels"][s.meta["evidence_panel"]]
        ys, xs = np.nonzero(_ink(_interior(np.asarray(image), ev)))
        ih = ev["box"][3] - ev["box"][1] - 2 * ev["border"]
        iw = ev["box"][2] - ev["box"][0] - 2 * ev["border"]
        extent = max((xs.max() - xs.min() + 1) / iw, (ys.max() - ys.min() + 1) / ih)
        assert extent > 0.65, s.id


# ----------------------------------------------------------------------------- files


def test_split_files_load_and_resume(tmp_path, monkeypatch):
    path = generate_split(tmp_path, "val", 8, seed=2, size=SMALL, progress=False)
    assert path == tmp_path / "val.jsonl"
    samples = read_samples(path)
    assert [s.id for s in samples] == [f"val_{i:06d}" for i in range(8)]
    for i, s in enumerate(samples):
        assert Path(s.image) == tmp_path / "images" / f"val_{i:06d}.png"
        image, fresh = generate_sample(i, split="val", seed=2, size=SMALL)
        assert s == fresh.with_(image=s.image)
        assert (np.asarray(Image.open(s.image).convert("RGB")) == np.asarray(image)).all()
    assert not list((tmp_path / "images").glob("*.tmp"))

    # Resume: nothing is re-rendered; a damaged file, and only it, is.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()}
    calls = []
    real = gen.render_scene
    monkeypatch.setattr(gen, "render_scene", lambda scene: calls.append(scene) or real(scene))
    generate_split(tmp_path, "val", 8, seed=2, size=SMALL, progress=False)
    assert calls == []
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()}
    (tmp_path / "images" / "val_000003.png").write_bytes(b"not a png")
    generate_split(tmp_path, "val", 8, seed=2, size=SMALL, progress=False)
    assert len(calls) == 1
    assert read_samples(path)[3] == samples[3]
    # Another seed in the same folder renders every scene anew.
    generate_split(tmp_path, "val", 8, seed=5, size=SMALL, progress=False)
    assert len(calls) == 9


def test_contact_sheet_size(tmp_path):
    samples = read_samples(generate_split(tmp_path, "test", 5, size=SMALL, progress=False))
    out = contact_sheet(samples, tmp_path / "sheet.png", cols=2, thumb=96)
    cw, ch = cell_size(96, True)
    assert Image.open(out).size == (2 * cw, 3 * ch)
    out = contact_sheet(samples[:3], tmp_path / "sheet2.png", cols=4, thumb=64, show_crops=False)
    cw, ch = cell_size(64, False)
    assert Image.open(out).size == (3 * cw, ch)


def test_split_with_workers_is_identical(tmp_path):
    one = read_samples(generate_split(tmp_path / "a", "val", 5, seed=3, size=SMALL, progress=False))
    two = read_samples(generate_split(tmp_path / "b", "val", 5, seed=3, size=SMALL, progress=False, workers=2))
    assert [s.with_(image=Path(s.image).name) for s in one] == [s.with_(image=Path(s.image).name) for s in two]
    for s, t in zip(one, two):
        assert (tmp_path / "a" / "images" / Path(s.image).name).read_bytes() == Path(t.image).read_bytes()
