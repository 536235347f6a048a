"""The synthesis store: append-only JSONL files of stage results, keyed by content.

One file per stage (`<stage>.jsonl`, or `<stage>.<i>of<n>.jsonl` for shard i of n, so machines
sharing a folder never write the same file). Each line is `{"key": ..., **record}`.

Crash safety: a batch of records is written with one `write` on an O_APPEND descriptor, then
flushed to disk (fsync) before the caller goes on. A `kill -9` can tear only the last line; a
torn line is skipped on load, and the next append starts on a fresh line. A key found twice
(two shards did the same work) keeps its first record. Records mean "done, and this is what came
out", including "nothing came out", so no call is paid for twice; failed calls are not stored
and are retried by the next run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("zoomless.synth")

Record = dict[str, Any]


class Store:
    def __init__(self, root: str | Path, shard: tuple[int, int] = (0, 1)):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard = shard
        self._tables: dict[str, dict[str, Record]] = {}
        self.torn_lines = 0

    def path(self, stage: str) -> Path:
        i, n = self.shard
        return self.root / (f"{stage}.jsonl" if n == 1 else f"{stage}.{i}of{n}.jsonl")

    def files(self, stage: str) -> list[Path]:
        """Every file of a stage, this shard's and other shards' (first the unsharded one)."""
        plain = self.root / f"{stage}.jsonl"
        return ([plain] if plain.exists() else []) + sorted(self.root.glob(f"{stage}.*of*.jsonl"))

    def table(self, stage: str) -> dict[str, Record]:
        """All records of a stage by key (loaded once, then kept up to date by `put`)."""
        if stage not in self._tables:
            table: dict[str, Record] = {}
            for path in self.files(stage):
                for rec in self._read(path):
                    table.setdefault(rec["key"], rec)
            self._tables[stage] = table
        return self._tables[stage]

    def _read(self, path: Path) -> Iterable[Record]:
        with path.open("rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                rec = None
            if not isinstance(rec, dict) or "key" not in rec:
                self.torn_lines += 1  # a line cut by a crash: its work is simply done again
                log.warning("%s:%d: skipping a torn or unreadable line", path, i + 1)
                continue
            yield rec

    def get(self, stage: str, key: str) -> Record | None:
        return self.table(stage).get(key)

    def has(self, stage: str, key: str) -> bool:
        return key in self.table(stage)

    def put(self, stage: str, records: Iterable[tuple[str, Record]]) -> None:
        """Append (key, record) pairs durably; keys already stored are skipped."""
        table = self.table(stage)
        lines = []
        for key, rec in records:
            if key in table:
                continue
            row = {"key": key, **rec}
            table[key] = row
            lines.append(json.dumps(row, ensure_ascii=False, sort_keys=True))
        if lines:
            append_lines(self.path(stage), lines)

    def log(self, name: str, row: Record) -> None:
        """Append one free-form row (usage accounting) to `<name>.jsonl`; read back with `rows`."""
        append_lines(self.path(name), [json.dumps(row, sort_keys=True)])

    def rows(self, name: str) -> list[Record]:
        out = []
        for path in self.files(name):
            with path.open("rb") as f:
                for line in f.read().split(b"\n"):
                    try:
                        rec = json.loads(line) if line.strip() else None
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        rec = None
                    if isinstance(rec, dict):
                        out.append(rec)
        return out


def append_lines(path: Path, lines: list[str]) -> None:
    """Append whole lines durably: one O_APPEND write, then fsync. A torn last line left by a crash
    is first closed with a newline, so it stays a single unreadable line."""
    data = ("\n".join(lines) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with path.open("rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: a temp file in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
