"""One function per public benchmark: rows of its local files -> Samples.

Each loader builds the prompt the benchmark's public evaluations send (so scores stay comparable)
and stores it as the sample's question, with meta["prompt_final"] = True: evaluation sends it as
is and appends nothing. The benchmark's own question is kept in meta["raw_question"], its category
in `dimension`. Gold answers: the option text with `options` set when the options are known as a
list, else the letter (options written inside the question) or the free-form text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from zoomless.eval.benchmarks.files import (
    ImageStore,
    Row,
    csv_rows,
    find_files,
    image_cell,
    image_size,
    json_rows,
    parquet_rows,
    path_cell,
    text_cell,
)
from zoomless.eval.benchmarks.options import (
    gold_letter,
    mcq_fields,
    option_order,
    split_written_options,
    strip_label,
)
from zoomless.sample import LETTERS, Box, ImageRef, Sample, SampleError, validate

VSTAR_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
HRBENCH_LEAD = " Select from the following choices."
MME_EN = (
    " The choices are listed below:\n",
    "\nSelect the best answer to the above multiple-choice question based on the image. "
    "Respond with only the letter (A, B, C, D, or E) of the correct option.\nThe best answer is: ",
)
MME_CN = (
    " 选项如下所示:\n",
    "\n根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D 或 E）。\n最佳答案为： ",
)


@dataclass(frozen=True)
class Context:
    bench: str  # the registry name, recorded in meta["benchmark"]
    seed: int = 0  # option order for benchmarks that shuffle (V*); 0 keeps the published order
    store: ImageStore = field(default_factory=ImageStore)  # keeps bytes in the samples


def _sample(
    ctx: Context,
    row: Row,
    *,
    id: str,
    image: ImageRef,
    prompt: str,
    raw_question: str,
    answer: str,
    options: tuple[str, ...] | None = None,
    dimension: str | None = None,
    teacher_image: ImageRef | None = None,
    box: Box | None = None,
    **meta: Any,
) -> Sample:
    info = {"benchmark": ctx.bench, "raw_question": raw_question, "prompt_final": True}
    info.update({k: v for k, v in meta.items() if v is not None})
    s = Sample(
        id=id,
        image=image,
        question=prompt,
        answer=answer,
        options=options,
        box=box,
        dimension=dimension,
        teacher_image=teacher_image,
        meta=info,
    )
    return validate(s, row.where)


def _row_id(row: Row, key: str = "id") -> str:
    return text_cell(row, key, required=False) or str(row.index)


# ----------------------------------------------------------------------------- ZoomBench


def _zoombench_box(value: Any, image: ImageRef, where: str) -> tuple[Box | None, Any]:
    """(box, raw): the box when `value` is an in-bounds [x1, y1, x2, y2] in pixels, else None; the
    raw value is kept in meta either way, as its convention is not documented."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, value
    if value is None:
        return None, None
    try:
        x1, y1, x2, y2 = (float(v) for v in value)
    except (TypeError, ValueError):
        return None, value
    raw = [x1, y1, x2, y2]
    try:
        w, h = image_size(image)
    except (OSError, Image.DecompressionBombError):
        return None, raw
    box = tuple(int(round(v)) for v in raw)
    if 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h:
        return box, raw
    return None, raw


def zoombench(path: Path, ctx: Context) -> Iterator[Sample]:
    required = {"query": ("query", "prompt"), "response": ("response", "answer"), "image": ("image",)}
    optional = {
        "id": ("id",),
        "crop_image": ("crop_image",),
        "dimension": ("question_type", "dimension", "category"),
        "bbox": ("bbox",),
    }
    for file in find_files(path, ctx.bench, ("test.parquet", "*.parquet")):
        for row in parquet_rows(file, ctx.bench, required, optional):
            query = text_cell(row, "query")
            image = image_cell(row, "image", ctx.store)
            box, raw_box = _zoombench_box(row.values.get("bbox"), image, row.where)
            yield _sample(
                ctx,
                row,
                id=_row_id(row),
                image=image,
                prompt=query,
                raw_question=query,
                answer=text_cell(row, "response"),
                dimension=text_cell(row, "dimension", required=False),
                teacher_image=image_cell(row, "crop_image", ctx.store, required=False),
                box=box,
                bbox=raw_box,
            )


# ----------------------------------------------------------------------------- V*


def vstar(path: Path, ctx: Context) -> Iterator[Sample]:
    """V* Bench. With seed != 0 the options written in `text` are reordered (fixed per seed and
    question) and the gold letter follows its option; seed 0 keeps the published text."""
    required = {"image": ("image",), "text": ("text",), "label": ("label",)}
    optional = {"question_id": ("question_id",), "category": ("category",)}
    for file in find_files(path, ctx.bench, ("test-*.parquet", "*.parquet")):
        for row in parquet_rows(file, ctx.bench, required, optional):
            text = text_cell(row, "text")
            letter = gold_letter(text_cell(row, "label"), row.where, "label")
            qid = _row_id(row, "question_id")
            question, options, answer, order = text, None, letter, None
            written = split_written_options(text)
            if written is not None and LETTERS.index(letter) < len(written.options):
                order = option_order(len(written.options), ctx.seed, qid)
                shuffled = [written.options[j] for j in order]
                letter = LETTERS[order.index(LETTERS.index(letter))]
                if order != sorted(order):
                    question = written.render(shuffled)
                options, answer = mcq_fields(shuffled, letter, row.where)
            if not question.endswith(VSTAR_SUFFIX.strip()):
                question += VSTAR_SUFFIX
            yield _sample(
                ctx,
                row,
                id=qid,
                image=image_cell(row, "image", ctx.store),
                prompt=question,
                raw_question=text,
                answer=answer,
                options=options,
                dimension=text_cell(row, "category", required=False),
                answer_letter=letter,
                option_order=order,
                seed=ctx.seed,
            )


# ----------------------------------------------------------------------------- HR-Bench


def hrbench(path: Path, ctx: Context) -> Iterator[Sample]:
    required = {
        "index": ("index",),
        "question": ("question",),
        "answer": ("answer",),
        "A": ("A",),
        "B": ("B",),
        "image": ("image",),
    }
    optional = {"C": ("C",), "D": ("D",), "category": ("category",)}
    size = ctx.bench.rsplit("-", 1)[-1] if ctx.bench != "hrbench" else ""
    patterns = (f"hr_bench_{size}*.parquet", f"*{size}*.parquet") if size else ("*.parquet",)
    for file in find_files(path, ctx.bench, patterns):
        for row in parquet_rows(file, ctx.bench, required, optional):
            question = text_cell(row, "question")
            opts = []
            for letter in "ABCD":  # stop at the first missing option, as the letters must stay dense
                opt = text_cell(row, letter, required=False)
                if opt is None:
                    break
                opts.append(opt)
            letter = gold_letter(text_cell(row, "answer"), row.where)
            lines = "".join(f"\n({LETTERS[i]}) {o}" for i, o in enumerate(opts))
            options, answer = mcq_fields(opts, letter, row.where)
            yield _sample(
                ctx,
                row,
                id=text_cell(row, "index"),
                image=image_cell(row, "image", ctx.store),
                prompt=question + HRBENCH_LEAD + lines,
                raw_question=question,
                answer=answer,
                options=options,
                dimension=text_cell(row, "category", required=False),
                answer_letter=letter,
            )


# ----------------------------------------------------------------------------- MME-RealWorld


def _option_list(row: Row, key: str) -> list[str]:
    value = row.values.get(key)
    if isinstance(value, str):
        value = value.splitlines()
    if not isinstance(value, (list, tuple)) or not value:
        raise SampleError(f"{row.where}: '{key}' must be a non-empty list of options, got {value!r}")
    return [str(v).strip() for v in value if str(v).strip()]


def mme_realworld(path: Path, ctx: Context) -> Iterator[Sample]:
    """MME-RealWorld, lmms-eval release (EN, CN, Lite): the prompt is lmms-eval's, in Chinese for CN."""
    required = {
        "index": ("index",),
        "question": ("question",),
        "options": ("multi-choice options",),
        "answer": ("answer",),
        "image": ("bytes", "image"),
    }
    optional = {"category": ("category",), "l2_category": ("l2-category", "l2_category"), "subtask": ("subtask",)}
    lead, tail = MME_CN if ctx.bench.endswith("-cn") else MME_EN
    for file in find_files(path, ctx.bench, ("*.parquet",)):
        for row in parquet_rows(file, ctx.bench, required, optional):
            question = text_cell(row, "question")
            lines = _option_list(row, "options")
            letter = gold_letter(text_cell(row, "answer"), row.where)
            texts = [strip_label(line, LETTERS[i]) for i, line in enumerate(lines)]
            if all(t is not None for t in texts):
                options, answer = mcq_fields(texts, letter, row.where)
            else:  # options not labelled "(A) ...": keep them inside the prompt only
                options, answer = None, letter
            yield _sample(
                ctx,
                row,
                id=text_cell(row, "index"),
                image=image_cell(row, "image", ctx.store),
                prompt=question + lead + "\n".join(lines) + tail,
                raw_question=question,
                answer=answer,
                options=options,
                dimension=text_cell(row, "category", required=False),
                answer_letter=letter,
                l2_category=text_cell(row, "l2_category", required=False),
                subtask=text_cell(row, "subtask", required=False),
            )


# ----------------------------------------------------------------------------- MMStar


def mmstar(path: Path, ctx: Context) -> Iterator[Sample]:
    required = {"index": ("index",), "question": ("question",), "answer": ("answer",), "image": ("image",)}
    optional = {"category": ("category",), "l2_category": ("l2_category", "l2-category")}
    for file in find_files(path, ctx.bench, ("mmstar*.parquet", "*.parquet")):
        for row in parquet_rows(file, ctx.bench, required, optional):
            question = text_cell(row, "question")
            yield _sample(
                ctx,
                row,
                id=text_cell(row, "index"),
                image=image_cell(row, "image", ctx.store),
                prompt=question,
                raw_question=question,
                answer=gold_letter(text_cell(row, "answer"), row.where),
                dimension=text_cell(row, "category", required=False),
                l2_category=text_cell(row, "l2_category", required=False),
            )


# ----------------------------------------------------------------------------- POPE


def pope(path: Path, ctx: Context) -> Iterator[Sample]:
    required = {"question": ("question",), "answer": ("answer",), "image": ("image",)}
    optional = {
        "question_id": ("question_id",),
        "id": ("id",),
        "category": ("category",),
        "image_source": ("image_source",),
    }
    for file in find_files(path, ctx.bench, ("*.parquet",)):
        for row in parquet_rows(file, ctx.bench, required, optional):
            question = text_cell(row, "question")
            answer = text_cell(row, "answer").lower()
            if answer not in ("yes", "no"):
                raise SampleError(f"{row.where}: 'answer' must be yes or no, got {answer!r}")
            split = text_cell(row, "category", required=False)
            qid = text_cell(row, "question_id", required=False) or _row_id(row)
            yield _sample(
                ctx,
                row,
                id=f"{split}/{qid}" if split else qid,  # question ids repeat across the three splits
                image=image_cell(row, "image", ctx.store),
                prompt=question + POPE_SUFFIX,
                raw_question=question,
                answer=answer,
                dimension=split,
                image_source=text_cell(row, "image_source", required=False),
            )


# ----------------------------------------------------------------------------- CV-Bench


def cvbench(path: Path, ctx: Context) -> Iterator[Sample]:
    required = {"prompt": ("prompt",), "answer": ("answer",), "image": ("image",)}
    optional = {
        "idx": ("idx",),
        "type": ("type",),
        "task": ("task",),
        "source": ("source",),
        "question": ("question",),
        "choices": ("choices",),
    }
    for file in find_files(path, ctx.bench, ("test_*.parquet", "*.parquet")):
        for row in parquet_rows(file, ctx.bench, required, optional):
            prompt = text_cell(row, "prompt")
            letter = gold_letter(text_cell(row, "answer"), row.where)
            kind = text_cell(row, "type", required=False)
            idx = _row_id(row, "idx")
            choices = row.values.get("choices")
            options, answer = None, letter
            if isinstance(choices, (list, tuple)) and LETTERS.index(letter) < len(choices):
                options, answer = mcq_fields([str(c).strip() for c in choices], letter, row.where)
            yield _sample(
                ctx,
                row,
                id=f"{kind.lower()}/{idx}" if kind else idx,  # idx restarts in the 2D and 3D files
                image=image_cell(row, "image", ctx.store),
                prompt=prompt,
                raw_question=text_cell(row, "question", required=False) or prompt,
                answer=answer,
                options=options,
                dimension=text_cell(row, "task", required=False),
                answer_letter=letter,
                type=kind,
                source=text_cell(row, "source", required=False),
            )


# ----------------------------------------------------------------------------- MMVP

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def _mmvp_images(csv_file: Path) -> dict[str, Path]:
    """Image files by stem ("1" -> .../MMVP Images/1.jpg) from the folder next to Questions.csv."""
    for name in ("MMVP Images", "MMVP_Images", "images"):
        folder = csv_file.parent / name
        if folder.is_dir():
            return {p.stem: p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES}
    raise SampleError(f"{csv_file}: no 'MMVP Images' folder next to it (mmvp)")


def mmvp(path: Path, ctx: Context) -> Iterator[Sample]:
    """MMVP: Questions.csv + "MMVP Images/<Index>.jpg". Pairs of rows (1-2, 3-4, ...) share a
    question on two images; meta["pair"] lets metrics score pairs as the paper does."""
    required = {
        "index": ("Index", "lndex", "index"),
        "question": ("Question",),
        "options": ("Options",),
        "answer": ("Correct Answer",),
    }
    for file in find_files(path, ctx.bench, ("Questions.csv", "*.csv")):
        images = _mmvp_images(file)
        for row in csv_rows(file, ctx.bench, required):
            index = text_cell(row, "index")
            if index not in images:
                raise SampleError(f"{row.where}: no image named {index}.* in {file.parent / 'MMVP Images'}")
            question = text_cell(row, "question")
            pair = (int(index) - 1) // 2 if index.isdigit() else None
            yield _sample(
                ctx,
                row,
                id=index,
                image=str(images[index].resolve()),
                prompt=question + " " + text_cell(row, "options"),
                raw_question=question,
                answer=gold_letter(text_cell(row, "answer"), row.where, "Correct Answer"),
                pair=pair,
            )


# ----------------------------------------------------------------------------- VisualProbe

_LEVEL = re.compile(r"(easy|medium|hard)", re.IGNORECASE)


def visualprobe(path: Path, ctx: Context) -> Iterator[Sample]:
    """VisualProbe (Easy / Medium / Hard, one val.json each): the level, read from the folder name
    (VisualProbe_Hard/val.json), is the dimension, as results are averaged over levels."""
    required = {"problem": ("problem",), "solution": ("solution",), "image": ("image", "images", "image_path")}
    optional = {"id": ("id", "question_id", "index")}
    for file in find_files(path, ctx.bench, ("val.json", "*.json", "*.jsonl")):
        m = _LEVEL.search(file.parent.name) or _LEVEL.search(file.name)
        level = m.group(1).lower() if m else None
        for row in json_rows(file, ctx.bench, required, optional):
            problem = text_cell(row, "problem")
            question = problem.replace("<image>", "").strip()
            if not question:
                raise SampleError(f"{row.where}: 'problem' holds nothing but <image>")
            answer = text_cell(row, "solution")
            answer = re.sub(r"^<answer>(.*)</answer>$", r"\1", answer, flags=re.DOTALL).strip() or answer
            rid = _row_id(row)
            yield _sample(
                ctx,
                row,
                id=f"{level}/{rid}" if level else rid,
                image=path_cell(row, "image", [file.parent, file.parent.parent]),
                prompt=question,
                raw_question=problem,
                answer=answer,
                dimension=level,
            )
