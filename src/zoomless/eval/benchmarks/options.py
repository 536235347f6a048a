"""Multiple-choice helpers: gold letters, option lists, options written in a question text, and
the seeded option shuffle (V* scores move by several points with option order alone).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from zoomless.sample import LETTERS, SampleError

_GOLD = re.compile(r"^(?:\(?([A-Ja-j])\)?[.:]?|\(([A-Ja-j])\)\s.*)$", re.DOTALL)  # "B", "(b)", "B.", "(b) Closed"
_LABEL = re.compile(r"^\s*\(([A-J])\)\s*")  # "(A) text"
_OPTION_LINE = re.compile(r"^\s*\(([A-J])\)\s*(.*?)\s*$")


def gold_letter(text: str | None, where: str, key: str = "answer") -> str:
    """"B", "b", "(B)", "(b)", "B.", "(b) Closed" -> "B"; anything else is an error naming the row."""
    m = _GOLD.match((text or "").strip())
    if m is None:
        raise SampleError(f"{where}: '{key}' must be an option letter such as 'A' or '(A)', got {text!r}")
    return (m.group(1) or m.group(2)).upper()


def strip_label(option: str, letter: str) -> str | None:
    """'(A) red' -> 'red' when the label is the expected letter; None when it is not labelled so."""
    m = _LABEL.match(option)
    if m is None or m.group(1) != letter:
        return None
    return option[m.end() :].strip()


def mcq_fields(options: list[str], letter: str, where: str) -> tuple[tuple[str, ...] | None, str]:
    """(options, answer) for a Sample: the option list and the gold option's text, or (None,
    letter) when the texts cannot identify the gold uniquely (duplicates, blanks)."""
    i = LETTERS.index(letter)
    if i >= len(options):
        raise SampleError(f"{where}: gold letter {letter} is outside the {len(options)} options")
    if any(not o for o in options) or len(set(options)) != len(options) or len(options) < 2:
        return None, letter
    return tuple(options), options[i]


@dataclass(frozen=True)
class WrittenOptions:
    """A question text split around its "(A) ...", "(B) ..." lines."""

    stem: str
    options: tuple[str, ...]
    tail: str

    def render(self, options: tuple[str, ...] | list[str]) -> str:
        lines = [self.stem] if self.stem else []
        lines += [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
        if self.tail:
            lines.append(self.tail)
        return "\n".join(lines)


def split_written_options(text: str) -> WrittenOptions | None:
    """Find consecutive lines "(A) ...", "(B) ...", ... (at least two, starting at A); None if absent."""
    lines = text.split("\n")
    for start, line in enumerate(lines):
        m = _OPTION_LINE.match(line)
        if m and m.group(1) == "A":
            break
    else:
        return None
    options: list[str] = []
    end = start
    while end < len(lines):
        m = _OPTION_LINE.match(lines[end])
        if m is None or m.group(1) != LETTERS[len(options)]:
            break
        options.append(m.group(2))
        end += 1
    if len(options) < 2:
        return None
    return WrittenOptions("\n".join(lines[:start]).rstrip(), tuple(options), "\n".join(lines[end:]).strip())


def option_order(n: int, seed: int, key: str) -> list[int]:
    """A permutation of range(n): identity for seed 0, else a shuffle fixed by (seed, key), so a
    row's order does not depend on which other rows were loaded."""
    order = list(range(n))
    if seed != 0:
        random.Random(f"option-order:{seed}:{key}").shuffle(order)  # str seeds hash with sha512: stable
    return order
