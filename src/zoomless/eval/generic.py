"""Loader for the generic benchmark JSON form used by the reference code bases.

One JSON list, or JSONL, of rows
    {"images": [path], "query": str, "response": gold, "crop_images": [path] (optional),
     "bbox": [x1, y1, x2, y2] (optional), "question_type": str (optional), "id": ... (optional)}
ZoomBench-derived files may say "prompt" for "query" and "answer" for "response"; both are read.
Paths are resolved against the file's folder. MCQ rows keep their options inside the query and a
letter gold; grading reads the letters from the query text. `crop_images[0]` becomes the sample's
teacher image: the crop view of a row without a bbox is that image (ZoomBench's own crop).
Images are not opened here: an unreadable image becomes a failed item at evaluation time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zoomless.sample import Sample, SampleError, read_samples, validate


def _rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) pairs: "file: row i" for a JSON list, "file: line n" for JSONL."""
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SampleError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return [(f"{path}: row {i}", row) for i, row in enumerate(data)]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}: line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise SampleError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
    return rows


def _path_list(row: dict, key: str, where: str, base: Path, required: bool) -> str | None:
    """The first path of a list-of-paths field (a bare string is accepted too), resolved."""
    value = row.get(key)
    if value is None or value == []:
        if required:
            raise SampleError(f"{where}: missing field '{key}'")
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not isinstance(value[0], str) or not value[0]:
        raise SampleError(f"{where}: '{key}' must be a list of image paths, got {value!r:.80}")
    p = Path(value[0])
    return str(p if p.is_absolute() else base / p)


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if row.get(k) is not None:
            return row[k]
    return None


def row_to_sample(row: Any, where: str, base: Path, default_id: str) -> Sample:
    if not isinstance(row, dict):
        raise SampleError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    image = _path_list(row, "images", where, base, required=True)
    query = _first(row, ("query", "prompt"))
    if not isinstance(query, str) or not query.strip():
        raise SampleError(f"{where}: missing field 'query' (a non-empty string)")
    gold = _first(row, ("response", "answer"))
    if gold is None or isinstance(gold, (dict, list)) or str(gold).strip() == "":
        raise SampleError(f"{where}: missing field 'response' (the gold answer)")
    box = row.get("bbox")
    if box is not None:
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise SampleError(f"{where}: 'bbox' must be [x1, y1, x2, y2] numbers, got {box!r:.80}")
        box = tuple(int(round(v)) for v in box)
    dimension = row.get("question_type")
    if dimension is not None and not isinstance(dimension, str):
        raise SampleError(f"{where}: 'question_type' must be a string, got {dimension!r:.40}")
    sample = Sample(
        id=str(row.get("id", default_id)),
        image=image,
        question=query.replace("<image>", "").strip(),
        answer=str(gold).strip(),
        box=box,
        dimension=dimension,
        teacher_image=_path_list(row, "crop_images", where, base, required=False),
    )
    return validate(sample, where)


def load_generic(path: str | Path) -> list[Sample]:
    """Read a generic-form benchmark file (JSON list or JSONL) into samples."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"{path}: no such file")
    samples: list[Sample] = []
    seen: set[str] = set()
    for i, (where, row) in enumerate(_rows(path)):
        s = row_to_sample(row, where, path.parent, default_id=str(i))
        if s.id in seen:
            raise SampleError(f"{where}: duplicate 'id' {s.id!r}")
        seen.add(s.id)
        samples.append(s)
    return samples


def load_benchmark(path: str | Path) -> list[Sample]:
    """Samples from a benchmark file: parquet or JSONL of sample records (`zoomless.sample`), or
    the generic form (a JSON list, or JSONL whose rows carry "images" and "query")."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return read_samples(path)
    with path.open() as f:
        first = next((line for line in f if line.strip()), "")
    if first.lstrip().startswith("["):
        return load_generic(path)
    try:
        row = json.loads(first)
    except json.JSONDecodeError as e:
        raise SampleError(f"{path}: first row is not valid JSON ({e.msg})") from None
    if isinstance(row, dict) and "images" in row and "image" not in row:
        return load_generic(path)
    return read_samples(path)
