"""Reading the public files: parquet/CSV/JSON rows, column names with alternatives, image cells.

Every failure raises SampleError with a one-line message that names the file, the row and the
field. Rows are read in batches and only the needed columns, so `limit` stops early and a large
benchmark (MME-RealWorld holds gigabytes of base64) is never held twice in memory.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from zoomless.sample import ImageRef, SampleError

# canonical name -> accepted column names; the first is the one the public file uses
Columns = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Row:
    where: str  # "file: row i", for error messages
    index: int  # 0-based position in its file
    file: Path
    values: dict[str, Any]  # canonical name -> cell (None when an optional column is absent)


# ----------------------------------------------------------------------------- files and columns


def find_files(path: Path, bench: str, patterns: Sequence[str]) -> list[Path]:
    """`path` itself when it is a file, else the files under the folder matching `patterns`."""
    if path.is_file():
        return [path]
    if not path.exists():
        raise SampleError(f"{path}: no such file or folder ({bench})")
    for pattern in patterns:
        found = sorted(p for p in path.rglob(pattern) if p.is_file())
        if found:
            return found
    raise SampleError(f"{path}: no {' or '.join(patterns)} file under this folder ({bench})")


def _describe(alternatives: Sequence[str]) -> str:
    first, *rest = alternatives
    return f"'{first}'" + (f" (or {', '.join(repr(a) for a in rest)})" if rest else "")


def resolve_columns(
    names: Sequence[str], required: Columns, optional: Columns | None, where: str, bench: str, what: str = "file"
) -> dict[str, str | None]:
    """Map canonical names to the actual column names; raise naming every missing one."""
    present = set(names)
    missing = [alts for alts in required.values() if not any(a in present for a in alts)]
    if missing:
        shown = ", ".join(names[:15]) + (", ..." if len(names) > 15 else "")
        raise SampleError(
            f"{where}: not a {bench} {what}: missing column(s) {', '.join(_describe(m) for m in missing)}"
            f" (found: {shown or 'none'})"
        )
    found: dict[str, str | None] = {}
    for key, alts in {**required, **(optional or {})}.items():
        found[key] = next((a for a in alts if a in present), None)
    return found


def _rename(values: Mapping[str, Any], columns: Mapping[str, str | None]) -> dict[str, Any]:
    return {key: (values.get(col) if col is not None else None) for key, col in columns.items()}


def parquet_schema_names(file: Path) -> list[str]:
    try:
        return list(pq.read_schema(file).names)
    except (pa.ArrowInvalid, OSError) as e:
        raise SampleError(f"{file}: not a readable parquet file ({' '.join(str(e).split())})") from None


def parquet_rows(file: Path, bench: str, required: Columns, optional: Columns | None = None) -> Iterator[Row]:
    columns = resolve_columns(parquet_schema_names(file), required, optional, str(file), bench)
    wanted = sorted({c for c in columns.values() if c is not None})
    index = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=32, columns=wanted):
        for values in batch.to_pylist():
            yield Row(f"{file}: row {index}", index, file, _rename(values, columns))
            index += 1


def csv_rows(file: Path, bench: str, required: Columns, optional: Columns | None = None) -> Iterator[Row]:
    with file.open(newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's BOM
        reader = csv.DictReader(f)
        names = [n.strip() for n in reader.fieldnames or []]
        reader.fieldnames = names
        columns = resolve_columns(names, required, optional, str(file), bench)
        for index, values in enumerate(reader):
            yield Row(f"{file}: row {index}", index, file, _rename(values, columns))


def json_rows(file: Path, bench: str, required: Columns, optional: Columns | None = None) -> Iterator[Row]:
    """A JSON list of objects, or JSONL. Columns are checked on the first row (and each row after)."""
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise SampleError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SampleError(f"{file}: line {n}: not valid JSON ({e.msg})") from None
    for index, values in enumerate(items):
        if not isinstance(values, dict):
            raise SampleError(f"{file}: row {index}: expected a JSON object, got {type(values).__name__}")
        where = f"{file}: row {index}"
        columns = resolve_columns(list(values), required, optional, where, bench, what="row")
        yield Row(where, index, file, _rename(values, columns))


# ----------------------------------------------------------------------------- cells


def text_cell(row: Row, key: str, required: bool = True) -> str | None:
    """A cell as stripped text; a required one must not be empty."""
    value = row.values.get(key)
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        value = None
    elif not isinstance(value, str):
        value = str(value)
    value = value.strip() if value is not None else None
    if required and not value:
        raise SampleError(f"{row.where}: '{key}' is empty")
    return value or None


def _b64decode(text: str, where: str, key: str) -> bytes:
    if text.startswith("data:") and "," in text[:100]:  # a data URI: data:image/png;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise SampleError(f"{where}: '{key}' is not valid base64 ({e})") from None


def _image_format(data: bytes, where: str, key: str) -> str:
    """The format named by the image header (no pixel is decoded); raise if it is not an image."""
    if not data:
        raise SampleError(f"{where}: '{key}' holds no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.format or "bin"
    except Image.DecompressionBombError:
        return "bin"  # an image, just a huge one: the pixel cap at load time decides
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SampleError(f"{where}: '{key}' is not an image ({' '.join(str(e).split())})") from None


def _existing_path(value: str, bases: Sequence[Path], where: str, key: str) -> str:
    p = Path(value)
    candidates = [p] if p.is_absolute() else [b / p for b in bases]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    raise SampleError(f"{where}: '{key}' file not found: {candidates[0] if candidates else value}")


_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


class ImageStore:
    """Where decoded image bytes go: kept in the sample, or written once into a folder (named by
    content hash) so a benchmark larger than memory can still be loaded."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def keep(self, data: bytes, fmt: str) -> ImageRef:
        if self.folder is None:
            return data
        ext = _EXTENSIONS.get(fmt, f".{fmt.lower()}")
        path = self.folder / f"{hashlib.sha1(data).hexdigest()[:24]}{ext}"
        if not path.exists():
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: a crash never leaves half an image under the final name
        return str(path)


def image_cell(row: Row, key: str, store: ImageStore, required: bool = True) -> ImageRef | None:
    """An image cell in any public encoding: an HF {bytes, path} struct, raw bytes, a base64
    string (or data URI), or a path (relative to the file's folder)."""
    value = row.values.get(key)
    if isinstance(value, dict):  # HF Image feature
        if value.get("bytes"):
            value = bytes(value["bytes"])
        elif value.get("path"):
            return _existing_path(value["path"], [row.file.parent], row.where, key)
        else:
            value = None
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise SampleError(f"{row.where}: '{key}' is empty")
        return None
    if isinstance(value, str):
        # A short string naming an existing file is a path; anything else must be base64.
        if len(value) < 1024 and not value.startswith("data:"):
            p = Path(value)
            base = p if p.is_absolute() else row.file.parent / p
            if base.is_file():
                return str(base.resolve())
        value = _b64decode(value, row.where, key)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return store.keep(data, _image_format(data, row.where, key))
    raise SampleError(f"{row.where}: '{key}' must be image bytes, base64 text or a path, got {type(value).__name__}")


def path_cell(row: Row, key: str, bases: Sequence[Path]) -> str:
    """An image path cell (a string, or a list whose first entry is used), resolved to an
    existing file against `bases` in order."""
    value = row.values.get(key)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise SampleError(f"{row.where}: '{key}' must be an image path, got {value!r}")
    return _existing_path(value.strip(), bases, row.where, key)


def image_size(ref: ImageRef) -> tuple[int, int]:
    """Width and height from the image header (bytes or path); no pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
            return im.size
