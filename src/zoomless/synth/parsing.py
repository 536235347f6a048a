"""Strict parsing helpers shared by the stages: model text in, a value or None out, never an exception."""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)


def json_list(text: str) -> list | None:
    """The JSON list a reply holds: the first fenced block, else the span from the first "[" to the
    last "]". None when there is no such list (a dict, broken JSON, prose)."""
    if not isinstance(text, str):
        return None
    m = _FENCE.search(text)
    candidates = [m.group(1)] if m else []
    start, end = text.find("["), text.rfind("]")
    if end > start >= 0:
        candidates.append(text[start : end + 1])
    for c in candidates:
        try:
            value = json.loads(c)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, list):
            return value
    return None


def four_numbers(value: Any) -> tuple[float, float, float, float] | None:
    """[x1, y1, x2, y2] as finite floats, else None (booleans and strings are not numbers)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def unmarkdown(text: str) -> str:
    """Drop emphasis and heading marks ("**VALID:** Yes" -> "VALID: Yes")."""
    return re.sub(r"[*_#`]+", "", text)


def clip(text: str, limit: int) -> str:
    """At most about `limit` characters: the head (where JSON lists start) and the longer tail
    (where verdicts and boxed answers end), so a rambling reply does not fill the store."""
    if len(text) <= limit:
        return text
    head = limit // 4
    return text[:head] + "\n[...]\n" + text[len(text) - (limit - head):]


def short_hash(*parts: Any, n: int = 16) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:n]


def seed_of(*parts: Any) -> int:
    """A sampling seed fixed by content, so a resumed run asks exactly what a fresh run would."""
    return int(short_hash(*parts, n=8), 16)
