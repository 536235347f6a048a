"""The sample record: the contract between synthesis, training and evaluation.

A sample is one question about one image. Views (full, crop, overlay, ...) are derived from it by
`zoomless.imaging`, never stored twice. Images are referenced either by a path (relative paths are
resolved against the dataset file's folder) or carried as encoded bytes.

Gold answers: `answer` is always the answer *text*. When `options` is given it contains `answer`, so
one record carries both the open form (ignore `options`) and the multiple-choice form (the letter
of `answer` in `options`). Public MCQ benchmarks whose gold is only a letter store that letter in
`answer` and leave `options` empty; grading handles both.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

ImageRef = str | bytes  # a path, or the encoded file bytes (PNG, JPEG, ...)
Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in original pixels, x2/y2 exclusive

LETTERS = "ABCDEFGHIJ"


class SampleError(ValueError):
    """A row that cannot become a sample; the message names the file, row and field."""


@dataclass(frozen=True)
class Sample:
    id: str
    image: ImageRef
    question: str
    answer: str | None = None
    options: tuple[str, ...] | None = None
    box: Box | None = None
    dimension: str | None = None
    teacher_image: ImageRef | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def answer_letter(self) -> str | None:
        """The gold letter in the multiple-choice form, or None without options."""
        if not self.options or self.answer is None:
            return None
        return LETTERS[self.options.index(self.answer)]

    def with_(self, **changes: Any) -> "Sample":
        return replace(self, **changes)


def validate(s: Sample, where: str = "sample") -> Sample:
    """Check the invariants that every job relies on; raise SampleError naming `where`."""
    if not s.id:
        raise SampleError(f"{where}: empty 'id'")
    if not s.question or not isinstance(s.question, str):
        raise SampleError(f"{where}: 'question' must be a non-empty string")
    if s.options is not None:
        if len(s.options) < 2 or len(s.options) > len(LETTERS):
            raise SampleError(f"{where}: 'options' must hold 2 to {len(LETTERS)} entries")
        if s.answer is not None and s.answer not in s.options:
            raise SampleError(f"{where}: 'answer' {s.answer!r} is not one of 'options'")
    if s.box is not None:
        if len(s.box) != 4:
            raise SampleError(f"{where}: 'box' must be [x1, y1, x2, y2]")
        x1, y1, x2, y2 = s.box
        if not (x2 > x1 and y2 > y1 and x1 >= 0 and y1 >= 0):
            raise SampleError(f"{where}: 'box' {list(s.box)} is empty or negative")
    return s


# ----------------------------------------------------------------------------- (de)serialisation

_REQUIRED = ("id", "image", "question")


def _image_to_json(ref: ImageRef | None) -> Any:
    if ref is None or isinstance(ref, str):
        return ref
    return {"bytes_b64": base64.b64encode(ref).decode("ascii")}


def _image_from_json(value: Any, base: Path | None, where: str, key: str) -> ImageRef | None:
    if value is None:
        return None
    if isinstance(value, dict):  # {"bytes_b64": ...} here, or an HF Image struct {"bytes", "path"}
        if value.get("bytes_b64"):
            return base64.b64decode(value["bytes_b64"])
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            raise SampleError(f"{where}: '{key}' has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        p = Path(value)
        if not p.is_absolute() and base is not None:
            p = base / p
        return str(p)
    raise SampleError(f"{where}: '{key}' must be a path or image bytes, got {type(value).__name__}")


def to_row(s: Sample) -> dict[str, Any]:
    row = asdict(s)
    row["options"] = list(s.options) if s.options is not None else None
    row["box"] = list(s.box) if s.box is not None else None
    return row


def from_row(row: dict[str, Any], where: str, base: Path | None = None) -> Sample:
    missing = [k for k in _REQUIRED if row.get(k) in (None, "")]
    if missing:
        raise SampleError(f"{where}: missing column(s) {', '.join(repr(m) for m in missing)}")
    box = row.get("box")
    try:
        box = tuple(int(round(float(v))) for v in box) if box is not None else None
    except (TypeError, ValueError):
        raise SampleError(f"{where}: 'box' must be four numbers, got {box!r}") from None
    options = row.get("options")
    meta = row.get("meta") or {}
    if isinstance(meta, str):
        meta = json.loads(meta)
    s = Sample(
        id=str(row["id"]),
        image=_image_from_json(row["image"], base, where, "image"),
        question=row["question"],
        answer=None if row.get("answer") is None else str(row["answer"]),
        options=tuple(str(o) for o in options) if options is not None else None,
        box=box,
        dimension=row.get("dimension"),
        teacher_image=_image_from_json(row.get("teacher_image"), base, where, "teacher_image"),
        meta=dict(meta),
    )
    return validate(s, where)


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in samples:
            row = to_row(s)
            row["image"] = _image_to_json(s.image)
            row["teacher_image"] = _image_to_json(s.teacher_image)
            f.write(json.dumps(row) + "\n")
    return path


def iter_jsonl(path: str | Path) -> Iterator[Sample]:
    path = Path(path)
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SampleError(f"{where}: not valid JSON ({e.msg})") from None
            yield from_row(row, where, path.parent)


_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", _IMAGE_STRUCT),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("options", pa.list_(pa.string())),
        ("box", pa.list_(pa.int64())),
        ("dimension", pa.string()),
        ("teacher_image", _IMAGE_STRUCT),
        ("meta", pa.string()),
    ]
)


def _image_struct(ref: ImageRef | None, embed: bool, base: Path) -> dict[str, Any] | None:
    if ref is None:
        return None
    if isinstance(ref, bytes):
        return {"bytes": ref, "path": None}
    # A relative path means relative to the dataset file, as when reading.
    return {"bytes": (base / ref).read_bytes() if embed else None, "path": ref}


def write_parquet(samples: Iterable[Sample], path: str | Path, embed_images: bool = True) -> Path:
    """Write samples as parquet; images become HF-style {bytes, path} structs (embedded by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        row = to_row(s)
        row["image"] = _image_struct(s.image, embed_images, path.parent)
        row["teacher_image"] = _image_struct(s.teacher_image, embed_images, path.parent)
        row["meta"] = json.dumps(s.meta)
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=_SCHEMA), path)
    return path


def iter_parquet(path: str | Path) -> Iterator[Sample]:
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise SampleError(f"{path}: not a readable parquet file ({e})") from None
    missing = [k for k in _REQUIRED if k not in table.column_names]
    if missing:
        raise SampleError(f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}")
    for i, row in enumerate(table.to_pylist()):
        yield from_row(row, f"{path}: row {i}", path.parent)


def read_samples(path: str | Path) -> list[Sample]:
    """Read a JSONL or parquet file of sample records."""
    path = Path(path)
    if not path.exists():
        raise SampleError(f"{path}: no such file")
    if path.suffix == ".parquet":
        return list(iter_parquet(path))
    return list(iter_jsonl(path))


def write_samples(samples: Iterable[Sample], path: str | Path) -> Path:
    path = Path(path)
    return write_parquet(samples, path) if path.suffix == ".parquet" else write_jsonl(samples, path)
