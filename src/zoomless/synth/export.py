"""Stage 10, export: the kept items in three forms.

- samples.parquet: zoomless Sample records for our trainers and eval (`zoomless.sample.read_samples`):
  image = the original full image (no box), box, the plain question, options, answer text,
  dimension, teacher_image = the zoomed crop the teachers saw; meta holds the overlay path
  (relative to the parquet's folder), the distilled problem text, votes and the student's score.
- easyr1.parquet: EasyR1 / verl rows: images = [overlay], problem = "<image>" + question + pointing
  sentence + options + instruction, answer = the letter (the text for the open form),
  data_source, ability (the dimension), extra_info {question, answer_text, id, bbox}, bbox.
- vision_opd.parquet: Vision-OPD rows: images = [student image], teacher_images = [teacher image],
  problem, answer, data_source, ability, extra_info.

Generated images live in <out>/images/{crops,overlays,overlay_crops}/, named by image hash and box,
written once (atomically). Rows are sorted by sample id, so the same store gives the same files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from zoomless.imaging import ImageError
from zoomless.sample import Sample, validate, write_parquet
from zoomless.synth.config import SynthConfig
from zoomless.synth.distill import mcq_problem, open_problem, overlay_crop, save_png
from zoomless.synth.funnel import Funnel
from zoomless.synth.items import Item, Region

_EXTRA = pa.struct([("question", pa.string()), ("answer_text", pa.string()), ("id", pa.string()),
                    ("bbox", pa.list_(pa.int64()))])
EASYR1_SCHEMA = pa.schema([
    ("images", pa.list_(pa.string())), ("problem", pa.string()), ("answer", pa.string()),
    ("data_source", pa.string()), ("ability", pa.string()), ("extra_info", _EXTRA), ("bbox", pa.list_(pa.int64())),
])
OPD_SCHEMA = pa.schema([
    ("images", pa.list_(pa.string())), ("teacher_images", pa.list_(pa.string())), ("problem", pa.string()),
    ("answer", pa.string()), ("data_source", pa.string()), ("ability", pa.string()), ("extra_info", _EXTRA),
])


@dataclass
class Views:
    """How to get the pictures of a region (the run caches them)."""

    crop: Callable[[Region], Image.Image]  # the zoomed crop the teachers saw
    overlay: Callable[[Region], Image.Image]  # the full image with the red box


class ImageFiles:
    """The generated image files of kept items, written on first use."""

    def __init__(self, out_dir: Path, views: Views, cfg: SynthConfig):
        self.root = out_dir / "images"
        self.views = views
        self.cfg = cfg

    def _file(self, kind: str, region: Region, make: Callable[[], Image.Image]) -> Path:
        path = self.root / kind / f"{region.file_stem}.png"
        if not path.exists():
            save_png(make(), path)
        return path

    def crop(self, region: Region) -> Path:
        return self._file("crops", region, lambda: self.views.crop(region))

    def overlay(self, region: Region) -> Path:
        return self._file("overlays", region, lambda: self.views.overlay(region))

    def overlay_crop(self, region: Region) -> Path:
        def make() -> Image.Image:
            return overlay_crop(self.views.overlay(region), region.box, self.cfg.distill.overlay_margin,
                                self.cfg.crop.zoom)

        return self._file("overlay_crops", region, make)


def to_sample(item: Item, files: ImageFiles, out_dir: Path, cfg: SynthConfig) -> Sample:
    region = item.region
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731 - paths in the parquet are relative to it
    meta = {
        "source": "zoomless-synth",
        "overlay": rel(files.overlay(region)),
        "problem": item.problem,
        "letter": item.letter,
        "image_sha1": region.image.sha1,
        "label": region.label,
        "score": region.score,
        "teacher_answers": list(item.answers),
        "votes": item.votes,
        "total": item.total,
        "student_correct": item.student_correct,
        "student_samples": item.student_samples,
        "crop_margin": cfg.crop.margin,
        "zoom": cfg.crop.zoom,
    }
    sample = Sample(
        id=item.sample_id, image=str(region.image.path), question=item.question, answer=item.answer,
        options=item.options, box=region.box, dimension=item.dimension,
        teacher_image=rel(files.crop(region)), meta=meta,
    )
    return validate(sample, f"item {item.key}")


def _extra(item: Item, problem: str) -> dict:
    return {"question": problem, "answer_text": item.answer, "id": item.sample_id, "bbox": list(item.region.box)}


def easyr1_row(item: Item, files: ImageFiles, cfg: SynthConfig) -> dict:
    return {
        "images": [str(files.overlay(item.region).resolve())],
        "problem": "<image>" + item.problem,
        "answer": item.letter or item.answer,
        "data_source": cfg.export.data_source,
        "ability": item.dimension or "perception",
        "extra_info": _extra(item, item.problem),
        "bbox": list(item.region.box),
    }


def opd_row(item: Item, files: ImageFiles, cfg: SynthConfig) -> dict:
    region = item.region
    if cfg.export.opd_student == "overlay":
        student, problem = files.overlay(region), item.problem
    else:  # the plain full image: no box, so no sentence pointing at one
        student = region.image.path
        problem = mcq_problem(item.question, item.options, pointing=False) if item.options else open_problem(
            item.question, pointing=False)
    teacher = files.crop(region) if cfg.export.opd_teacher == "crop" else files.overlay_crop(region)
    return {
        "images": [str(Path(student).resolve())],
        "teacher_images": [str(teacher.resolve())],
        "problem": "<image>" + problem,
        "answer": item.letter or item.answer,
        "data_source": cfg.export.data_source,
        "ability": item.dimension or "perception",
        "extra_info": _extra(item, problem),
    }


def _write_table(rows: list[dict], schema: pa.Schema, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)
    return path


def export(
    items: list[Item], views: Views, cfg: SynthConfig, funnel: Funnel, suffix: str = ""
) -> tuple[dict[str, Path], list[Item]]:
    """Write the three parquet files; returns their paths by form and the items written."""
    out = Path(cfg.out_dir)
    files = ImageFiles(out, views, cfg)
    unique: dict[str, Item] = {}
    for item in items:
        funnel.enter("export")
        if item.sample_id in unique:
            funnel.drop("export", "duplicate image (same content at another path)")
            continue
        unique[item.sample_id] = item
    kept, samples = [], []
    for key in sorted(unique):
        try:
            samples.append(to_sample(unique[key], files, out, cfg))  # writes the crop and overlay files
        except ImageError:
            funnel.drop("export", "source image unreadable at export")
            continue
        kept.append(unique[key])
    funnel.keep("export", len(kept))

    tmp = out / f".samples{suffix}.parquet.{os.getpid()}.tmp"
    write_parquet(samples, tmp, embed_images=cfg.export.embed_images)
    paths = {"samples": out / f"samples{suffix}.parquet"}
    os.replace(tmp, paths["samples"])
    paths["easyr1"] = _write_table([easyr1_row(it, files, cfg) for it in kept], EASYR1_SCHEMA,
                                   out / f"easyr1{suffix}.parquet")
    paths["vision_opd"] = _write_table([opd_row(it, files, cfg) for it in kept], OPD_SCHEMA,
                                       out / f"vision_opd{suffix}.parquet")
    return paths, kept
