"""YAML configs validated by pydantic, shared by every job (training recipes, synthesis).

A config is a YAML mapping plus `key=value` overrides from the command line (dotted keys reach
into sections, a number indexes a list: `roles.teachers.1.model=glm`). Unknown keys and bad values
fail at load time with one line naming the file and the key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the one-line message names the file and the key."""


def read_yaml(path: str | Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty for an empty file)."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such config file")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise error(f"{p}: the top level must be a mapping of keys to values")
    return loaded or {}


def set_dotted(tree: dict[str, Any], key: str, value: Any, error: type[ConfigError] = ConfigError) -> None:
    """Set "a.b.c" in a nested dict; a numeric part indexes a list ("roles.teachers.1.model")."""
    parts = key.split(".")
    node: Any = tree
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise error(f"override {key!r}: {p!r} is not an index of the list (0..{len(node) - 1})")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
        else:
            raise error(f"override {key!r}: {parts[i - 1]!r} is not a section")


def parse_overrides(items: list[str], error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """["lr=1e-4", "teacher=frozen"] -> {"lr": 0.0001, "teacher": "frozen"} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise error(f"override {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def format_errors(err: ValidationError, source: str) -> str:
    """pydantic's errors as one line: "file.yaml: a.b: unknown key; c: must be > 0"."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where}: {msg}")
    return f"{source}: " + "; ".join(parts)


def load_config(
    path: str | Path | None,
    cls: type[C],
    overrides: dict[str, Any] | None = None,
    *,
    error: type[ConfigError] = ConfigError,
    prepare: Callable[[dict[str, Any], Path], None] | None = None,
) -> C:
    """Read a YAML config (or none), let `prepare(raw, file_folder)` adjust what the file says (for
    example resolve its relative paths), apply `overrides`, and validate into `cls`."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path, error)
        if prepare is not None:
            prepare(raw, Path(path).resolve().parent)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value, error)
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise error(format_errors(e, str(path) if path is not None else "config")) from None
