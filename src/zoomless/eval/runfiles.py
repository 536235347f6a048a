"""The files that make an evaluation run resumable: one JSONL record per finished item, and the
settings the run was made with (a rerun in the same folder must ask the same question)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

SETTINGS = "settings.json"
T = TypeVar("T")


def read_records(path: Path, make: Callable[..., T], what: str) -> list[T]:
    """The records of a JSONL file, each built with `make(**row)`. A last line cut off by a crash is
    dropped from the file (it is redone); any other bad line is an error naming the line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # torn write: keep only whole lines
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    records = []
    for n, line in enumerate(raw.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(make(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a {what} record ({e})") from None
    return records


def check_settings(out_dir: Path, settings: dict[str, Any], keys: Iterable[str]) -> None:
    """Refuse to mix items made under different settings in one folder; then record the settings."""
    path = out_dir / SETTINGS
    if path.exists():
        old = json.loads(path.read_text())
        for k in keys:
            if old.get(k) != settings.get(k):
                raise ValueError(
                    f"{out_dir}: earlier items used {k}={old.get(k)!r}, this run asks "
                    f"{k}={settings.get(k)!r}; use another out_dir"
                )
    path.write_text(json.dumps(settings, indent=2) + "\n")
