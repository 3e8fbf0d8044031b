"""Bounds on what evaluating a config may cost: no loops run, but values can still grow without limit.

A few lines of arithmetic reach gigabytes or minutes: repeated squaring (``X = X * X``), doubling
(``X = X + X``), a list of a million references to a million-element list (cheap to build, a trillion
elements to print or walk), ``f"{1:>2000000000}"``, YAML aliases nested ten deep (billion laughs). So every
value is measured when it is made, and anything past these bounds is refused *before* the work is done
where the size can be foreseen (products, powers, repetitions, joins, format widths):

* ``MAX_INT_BITS``: integers; real configs stay below 64 bits.
* ``MAX_SIZE``: the *expanded* size of one value, in cells: a string counts its characters, a container
  one plus its elements', counted as often as they are referenced (so shared references count in full,
  as printing or serialising them would).
* ``MAX_DEPTH``: nesting of expressions and of values.
* ``MAX_WORK``: the sum of the sizes of all values made, which bounds the whole evaluation's time.
"""

from __future__ import annotations

import re
from typing import Any

MAX_INT_BITS = 1024
MAX_SIZE = 1_000_000
MAX_DEPTH = 100
MAX_WORK = 50_000_000
MAX_FORMAT_WIDTH = 10_000

_PRINTF = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d+)?(?:\.(\*|\d+))?")
_SPEC_NUMBERS = re.compile(r"\d+")


class TooBig(ValueError):
    """A value or the evaluation would pass a bound; the message says which, never the value itself."""


class SizeMeter:
    """Measures values (``size``), remembering containers and strings by identity, so a value made once
    and referenced many times is walked once; ``work`` is the total size of what was measured new."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[Any, int]] = {}  # id → (the object, kept alive so the id stays its own; size)
        self.work = 0

    def size(self, value: Any, depth: int = 0) -> int:
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return 1
        if isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise TooBig(f"an integer of {value.bit_length()} bits (at most {MAX_INT_BITS})")
            return 1
        known = self._known.get(id(value))
        if known is not None:
            if known[1] < 0:
                raise TooBig("a value that contains itself")
            return known[1]
        if depth > MAX_DEPTH:
            raise TooBig(f"values nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, (str, bytes)):
            total = max(1, len(value))
        elif isinstance(value, (list, tuple, set, frozenset, dict)):
            self._known[id(value)] = (value, -1)  # in progress: meeting it again is a cycle
            items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
            total = 1
            for item in items:
                total += self.size(item, depth + 1)
                if total > MAX_SIZE:
                    break
        else:
            return 1
        self._known[id(value)] = (value, total)
        if total > MAX_SIZE:
            raise TooBig(f"a value of more than {MAX_SIZE:,} elements or characters")
        self.work += total
        if self.work > MAX_WORK:
            raise TooBig(f"more than {MAX_WORK:,} elements made in all while evaluating")
        return total


def check_binop(op: str, left: Any, right: Any, meter: SizeMeter) -> None:
    """Refuse ``left op right`` before computing it when its result would pass a bound."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
    if op == "Pow" and ints and right > 0 and abs(left) > 1:
        if (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
            raise TooBig(f"a power of more than {MAX_INT_BITS} bits")
    elif op == "Mult" and ints:
        if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
            raise TooBig(f"a product of more than {MAX_INT_BITS} bits")
    elif op == "Mult":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and n > 0:
                if _content(seq, meter) * n > MAX_SIZE:
                    raise TooBig(f"a repetition of more than {MAX_SIZE:,} elements or characters")
    elif op == "Add" and isinstance(left, (str, list, tuple)) and type(left) is type(right):
        if _content(left, meter) + _content(right, meter) > MAX_SIZE:
            raise TooBig(f"a concatenation of more than {MAX_SIZE:,} elements or characters")
    elif op == "Mod" and isinstance(left, str):
        for width, precision in _PRINTF.findall(left):
            if "*" in (width, precision):
                raise TooBig("a `*` width in a %-format")
            check_format_numbers(f"{width} {precision}")


def _content(seq: str | list | tuple, meter: SizeMeter) -> int:
    """The size ``seq`` adds when repeated or concatenated: its elements (a container's own cell aside)."""
    return meter.size(seq) - (0 if isinstance(seq, str) else 1)


def check_format_numbers(spec: str) -> None:
    """Refuse a format spec (or %-format fields) asking for more than ``MAX_FORMAT_WIDTH`` characters."""
    for number in _SPEC_NUMBERS.findall(spec):
        if len(number) > 6 or int(number) > MAX_FORMAT_WIDTH:
            raise TooBig(f"a format width or precision over {MAX_FORMAT_WIDTH:,}")


def check_join(separator: str, items: Any, meter: SizeMeter) -> None:
    """Refuse ``separator.join(items)`` when the result would pass ``MAX_SIZE``."""
    if isinstance(items, (list, tuple)):
        if len(separator) * max(len(items) - 1, 0) + meter.size(items) > MAX_SIZE:
            raise TooBig(f"a join of more than {MAX_SIZE:,} characters")


def check_round(args: list) -> None:
    """``round(x, n)`` computes ``10 ** |n|``: refuse a huge ``n``."""
    if len(args) == 2 and isinstance(args[1], int) and abs(args[1]) > MAX_FORMAT_WIDTH:
        raise TooBig(f"round() to more than {MAX_FORMAT_WIDTH:,} digits")


def short(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters, for quoting code or values in a message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
