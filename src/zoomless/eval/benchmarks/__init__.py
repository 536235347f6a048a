"""Public benchmarks from local files: the registry, `load_benchmark` and `detect_benchmark`.

    samples = load_benchmark("vstar", "~/data/vstar-bench", seed=1)   # a file or its folder
    detect_benchmark("~/data/HR-Bench/hr_bench_8k.parquet")          # -> "hrbench-8k"

Users download the files themselves; nothing is fetched here. Every sample carries the benchmark's
published prompt as its question and meta["prompt_final"] = True (send it as is), the raw question
in meta["raw_question"], the benchmark name in meta["benchmark"] and its category as `dimension`.
Images embedded in the files become bytes in the samples (or files in `image_dir`, for benchmarks
too large to hold in memory); file-based benchmarks (MMVP, VisualProbe) keep resolved paths.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.parquet as pq

from zoomless.eval.benchmarks import loaders
from zoomless.eval.benchmarks.files import ImageStore, parquet_schema_names
from zoomless.eval.benchmarks.loaders import Context
from zoomless.sample import Sample, SampleError

__all__ = ["BENCHMARKS", "Loader", "benchmark_name", "detect_benchmark", "load_benchmark"]


@dataclass(frozen=True)
class Loader:
    name: str
    read: Callable[[Path, Context], Iterator[Sample]]
    files: str  # what the user points at


BENCHMARKS: dict[str, Loader] = {
    loader.name: loader
    for loader in (
        Loader("zoombench", loaders.zoombench, "ZoomBench data/test.parquet"),
        Loader("vstar", loaders.vstar, "V* Bench data/test-00000-of-00001.parquet"),
        Loader("hrbench-4k", loaders.hrbench, "HR-Bench hr_bench_4k.parquet"),
        Loader("hrbench-8k", loaders.hrbench, "HR-Bench hr_bench_8k.parquet"),
        Loader("hrbench", loaders.hrbench, "an HR-Bench parquet file of either size"),
        Loader("mme-realworld", loaders.mme_realworld, "MME-RealWorld-Lmms-eval data/*.parquet"),
        Loader("mme-realworld-cn", loaders.mme_realworld, "MME-RealWorld-CN-Lmms-eval data/*.parquet"),
        Loader("mme-realworld-lite", loaders.mme_realworld, "MME-RealWorld-lite-lmms-eval data/*.parquet"),
        Loader("mmstar", loaders.mmstar, "MMStar mmstar.parquet"),
        Loader("pope", loaders.pope, "POPE parquet (one split's file or folder)"),
        Loader("cvbench", loaders.cvbench, "CV-Bench test_2d.parquet / test_3d.parquet (or their folder)"),
        Loader("mmvp", loaders.mmvp, "MMVP Questions.csv next to the 'MMVP Images' folder"),
        Loader("visualprobe", loaders.visualprobe, "VisualProbe_{Easy,Medium,Hard}/val.json (or their folder)"),
    )
}

_ALIASES = {"v*": "vstar", "vstarbench": "vstar", "v*bench": "vstar", "mmerealworlden": "mme-realworld"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9*]", "", name.lower())


def benchmark_name(name: str) -> str:
    """The registry name for a user-written one ("HR-Bench 4K", "cv_bench", "V*" are accepted)."""
    keys = {_key(n): n for n in BENCHMARKS} | {_key(a): n for a, n in _ALIASES.items()}
    found = keys.get(_key(name))
    if found is None:
        raise SampleError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return found


def load_benchmark(
    name: str,
    path: str | Path,
    *,
    seed: int = 0,
    limit: int | None = None,
    image_dir: str | Path | None = None,
) -> list[Sample]:
    """Load the first `limit` samples (all when None) of benchmark `name` from a local file or folder.

    `seed` reorders the options of benchmarks that shuffle them (V*); 0 keeps the published order.
    `image_dir`: write embedded images there (named by content hash) and keep paths in the samples
    instead of bytes, for benchmarks larger than memory.
    """
    loader = BENCHMARKS[benchmark_name(name)]
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = Path(path).expanduser()
    store = ImageStore(Path(image_dir).expanduser() if image_dir is not None else None)
    samples: list[Sample] = []
    seen: set[str] = set()
    for s in islice(loader.read(path, Context(loader.name, seed, store)), limit):
        if s.id in seen:
            raise SampleError(
                f"{path}: duplicate sample id {s.id!r} ({loader.name}); "
                "point at one split's file, not a folder of several"
            )
        seen.add(s.id)
        samples.append(s)
    if not samples and limit != 0:
        raise SampleError(f"{path}: no rows ({loader.name})")
    return samples


# ----------------------------------------------------------------------------- detection

_CJK = re.compile(r"[\u4e00-\u9fff]")


def _first_text(file: Path, column: str) -> str:
    for batch in pq.ParquetFile(file).iter_batches(batch_size=1, columns=[column]):
        values = batch.column(0).to_pylist()
        if values:
            return str(values[0] or "")
    return ""


def _detect_parquet(file: Path) -> str | None:
    names = set(parquet_schema_names(file))
    stem = file.name.lower()
    near = "/".join(file.parts[-3:]).lower()  # the file and two folders: "MME-RealWorld-CN-Lmms-eval/data/x"
    if "multi-choice options" in names:
        if "lite" in near:
            return "mme-realworld-lite"
        cn = re.search(r"(^|[^a-z])cn([^a-z]|$)", near) or _CJK.search(_first_text(file, "question"))
        return "mme-realworld-cn" if cn else "mme-realworld"
    if {"text", "label", "image"} <= names:
        return "vstar"
    if {"question", "answer", "A", "B", "image"} <= names:
        return "hrbench-8k" if "8k" in stem else "hrbench-4k" if "4k" in stem else "hrbench"
    if {"image_source", "question", "answer"} <= names:
        return "pope"
    if {"prompt", "answer", "task"} <= names and ("idx" in names or "type" in names):
        return "cvbench"
    if {"question", "answer", "image"} <= names and ("l2_category" in names or "mmstar" in stem):
        return "mmstar"
    has_query = bool(names & {"query", "prompt"}) and bool(names & {"response", "answer"})
    if "crop_image" in names or (has_query and "image" in names):
        return "zoombench"
    return None


def _detect_json(file: Path) -> str | None:
    with file.open(encoding="utf-8") as f:
        head = f.read(1 << 16)
    first = head.lstrip()[:1]
    try:
        if first == "[":
            items = json.loads(file.read_text(encoding="utf-8"))
            row = items[0] if isinstance(items, list) and items else None
        else:
            row = json.loads(head.splitlines()[0]) if head.strip() else None
    except (json.JSONDecodeError, IndexError):
        return None
    if isinstance(row, dict) and {"problem", "solution"} <= set(row):
        return "visualprobe"
    return None


def detect_benchmark(path: str | Path) -> str | None:
    """The registry name of the public benchmark a file or folder holds, from its file names and
    columns; None when it is not one of them (the generic JSON form, for instance)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for pattern in ("Questions.csv", "val.json", "*.parquet"):
            found = sorted(path.rglob(pattern))
            if found:
                return detect_benchmark(found[0])
        return None
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return _detect_parquet(path)
        if suffix == ".csv":
            with path.open(encoding="utf-8-sig") as f:
                header = f.readline()
            return "mmvp" if "Correct Answer" in header else None
        if suffix in (".json", ".jsonl"):
            return _detect_json(path)
    except (OSError, SampleError, UnicodeDecodeError):
        return None
    return None
