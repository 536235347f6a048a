"""Generate ZoomWorld samples and splits: deterministic by (seed, split, index), resumable on disk."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, PngImagePlugin
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from zoomless.sample import Sample, to_row, write_jsonl
from zoomless.world.dimensions import DIMENSIONS
from zoomless.world.scene import Scene, plan_scene, render_scene

# Bump when the pictures change for the same plan, so that resumed runs re-render old files.
GENERATOR_VERSION = 1
_PNG_KEY = "zoomworld"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def scene_seed(split: str, index: int, seed: int = 0) -> int:
    """The seed of one scene; splits draw from disjoint streams (the split name is hashed in)."""
    ss = np.random.SeedSequence([seed, zlib.crc32(split.encode()), index])
    hi, lo = ss.generate_state(2).tolist()
    return ((hi << 32) | lo) & (2**53 - 1)  # fits a JSON number exactly


def sample_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def _to_sample(scene: Scene, split: str, index: int, seed: int, s_seed: int) -> Sample:
    ev = scene.evidence_panel
    x1, y1, x2, y2 = ev.box
    sid = sample_id(split, index)
    meta = {
        "source": "zoomworld",
        "split": split,
        "index": index,
        "seed": seed,
        "scene_seed": s_seed,
        "size": scene.size,
        "area_fraction": round((x2 - x1) * (y2 - y1) / scene.size**2, 6),
        "frame": ev.frame,
        "colour": ev.colour,
        "evidence_panel": scene.evidence,
        "panels": [p.to_meta() for p in scene.panels],
        "generator_version": GENERATOR_VERSION,
        **({"ocr": scene.ocr} if scene.ocr != "strings" else {}),
    }
    return Sample(
        id=sid,
        image=f"images/{sid}.png",
        question=scene.question,
        answer=scene.answer,
        options=scene.options,
        box=ev.box,
        dimension=scene.dimension,
        meta=meta,
    )


def plan_sample(
    index: int,
    *,
    split: str = "test",
    seed: int = 0,
    size: int = 1024,
    dimensions: Sequence[str] = DIMENSIONS,
    max_area_fraction: float = 0.03,
    min_area_fraction: float = 0.005,
    frame_fraction: float = 0.05,
    panels: tuple[int, int] = (4, 6),
    ocr: str = "strings",
) -> tuple[Scene, Sample]:
    """The scene plan and record of one sample, without rendering pixels."""
    if not dimensions:
        raise ValueError("dimensions must name at least one of " + ", ".join(DIMENSIONS))
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index} seed={seed}")
    if not _SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split {split!r} must be a plain name (letters, digits, '_', '-', '.'), e.g. train")
    dimension = dimensions[index % len(dimensions)]  # round robin: balanced dimensions
    s_seed = scene_seed(split, index, seed)
    scene = plan_scene(s_seed, dimension, size, min_area_fraction, max_area_fraction, frame_fraction, panels, ocr)
    return scene, _to_sample(scene, split, index, seed, s_seed)


def generate_sample(index: int, **options: Any) -> tuple[Image.Image, Sample]:
    """One sample: its RGB image and its record (image = "images/<id>.png", relative to the split
    folder). `options` are `plan_sample`'s (split, seed, size, panels, ocr, ...)."""
    scene, sample = plan_sample(index, **options)
    return render_scene(scene), sample


def _png_key(sample: Sample) -> str:
    """Fingerprint of everything that decides the pixels; stored inside the PNG to make resume safe."""
    row = to_row(sample)
    blob = json.dumps(row, sort_keys=True) + f"|v{GENERATOR_VERSION}"
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _is_current(path: Path, key: str) -> bool:
    try:
        with Image.open(path) as im:
            return im.info.get(_PNG_KEY) == key
    except (OSError, SyntaxError, ValueError):
        return False


def save_png(image: Image.Image, path: Path, key: str) -> None:
    """Write atomically (temp file + rename): a crash never leaves a half PNG that looks done."""
    info = PngImagePlugin.PngInfo()
    info.add_text(_PNG_KEY, key)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info, compress_level=1)
    os.replace(tmp, path)


def _render_one(job: tuple) -> Sample:
    """Plan one sample and render its PNG unless a current one is on disk (one unit of pool work)."""
    out, i, plan = job
    scene, sample = plan_sample(i, **plan)
    path = out / sample.image
    key = _png_key(sample)
    if not _is_current(path, key):
        save_png(render_scene(scene), path, key)
    return sample


def generate_split(
    out_dir: str | Path,
    split: str,
    n: int,
    *,
    seed: int = 0,
    size: int = 1024,
    dimensions: Sequence[str] = DIMENSIONS,
    max_area_fraction: float = 0.03,
    min_area_fraction: float = 0.005,
    frame_fraction: float = 0.05,
    panels: tuple[int, int] = (4, 6),
    ocr: str = "strings",
    progress: bool = True,
    workers: int = 0,
) -> Path:
    """Write out_dir/images/<split>_<index>.png and out_dir/<split>.jsonl; return the JSONL path.

    Resumable: a PNG already on disk that was made from the same plan is kept, not re-rendered.
    The JSONL is written once, at the end. `workers` > 0 renders in that many processes (the
    output is identical: every scene depends only on its own seed).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    plan = dict(split=split, seed=seed, size=size, dimensions=tuple(dimensions), max_area_fraction=max_area_fraction,
                min_area_fraction=min_area_fraction, frame_fraction=frame_fraction, panels=tuple(panels), ocr=ocr)
    plan_sample(0, **plan)  # bad arguments fail here, once
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = ((out, i, plan) for i in range(n))
    columns = (TextColumn(f"zoomworld {split}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    samples = []
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("render", total=n)
        if workers:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for sample in pool.imap(_render_one, jobs, chunksize=64):  # imap keeps index order
                    samples.append(sample)
                    bar.advance(task)
        else:
            for job in jobs:
                samples.append(_render_one(job))
                bar.advance(task)
    return write_jsonl(samples, out / f"{split}.jsonl")
