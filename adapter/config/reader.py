"""Read one config key as its ``fields.Field`` row says: the kind's type check, bounds, choices, InternEvo's default.

``Reader.value(path)`` is the whole contract: it reads a key once (a ``Same`` default reads the other key first),
records what was defaulted, and raises ``ConfigError`` naming the key as the user wrote it and its line.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable

from adapter.config import fields
from adapter.config.errors import ConfigError
from adapter.config.fields import REQUIRED, Field, Same
from adapter.config.load import RawConfig

MISSING: Any = object()
INT64 = 2**63


def suggest(word: Any, candidates) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


class Reader:
    """Typed access to the keys of one raw config.

    Args:
        raw: the loaded file.
        spelled: canonical path → (value, path as written) for keys written in another spelling
            (``spellings.canonical``); errors name the written path.
    """

    def __init__(self, raw: RawConfig, spelled: dict[str, tuple[Any, str]] | None = None):
        self.raw = raw
        self.spelled = spelled or {}
        self.yaml = raw.source.endswith((".yaml", ".yml"))
        self.family: str | None = None
        """Set once ``model_type`` is known: keys the family's builder does not take fall back silently."""
        self.defaulted: dict[str, Any] = {}
        self._values: dict[str, Any] = {}

    def error(self, path: str, message: str) -> ConfigError:
        return self.raw.error(self.spelled[path][1] if path in self.spelled else path, message)

    def lookup(self, path: str) -> Any:
        """The value as written (after spelling), or ``MISSING``."""
        if path in self.spelled:
            return self.spelled[path][0]
        node: Any = self.raw.values
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return MISSING
            node = node[part]
        return node

    def value(self, path: str) -> Any:
        """The normalised value of the key ``path`` (read once; later calls return the same value)."""
        if path not in self._values:
            self._values[path] = self._read(fields.BY_PATH[path])
        return self._values[path]

    def _read(self, f: Field) -> Any:
        value = self.lookup(f.path)
        if value is MISSING:
            value = self.value(f.default.path) if isinstance(f.default, Same) else f.default
            if value is REQUIRED:
                raise self.error(f.path, "is required")
            if not f.path.startswith(fields.ADAPTER_SECTION + ".") and (self.family is None or f.takes(self.family)):
                self.defaulted[f.path] = value
        out = _KINDS[f.kind](self, f, value)
        if f.parse is not None:
            try:
                out = f.parse(out)
            except ValueError as exc:
                raise self.error(f.path, str(exc)) from None
        if f.requires is not None and out != f.requires[0]:
            raise self.error(f.path, f"{value} cannot be translated: {f.requires[1]}")
        return out


def _bounded(r: Reader, f: Field, value: float) -> None:
    if f.minimum is not None and value < f.minimum:
        raise r.error(f.path, f"must be >= {f.minimum}, got {value}")
    if f.maximum is not None and value > f.maximum:
        raise r.error(f.path, f"must be <= {f.maximum}, got {value}")


def _int(r: Reader, f: Field, value: Any) -> int | None:
    if value is None and f.accepts_none:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise r.error(f.path, f"must be an integer, got {describe(value)}")
    if not -INT64 <= value < INT64:
        raise r.error(f.path, f"an integer of {value.bit_length()} bits does not fit the signed 64-bit integers "
                      "torch, numpy and DeepSpeed read")
    _bounded(r, f, value)
    return value


def _count(r: Reader, f: Field, value: Any) -> int | None:
    """InternEvo writes "never" as ``None`` or ``float("inf")``."""
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return None
    return _int(r, f, value)


def _float(r: Reader, f: Field, value: Any) -> float:
    if r.yaml and isinstance(value, str):
        try:  # PyYAML reads ``1e-5`` (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise r.error(f.path, f"must be a number, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise r.error(f.path, f"must be a finite number, got {value}")
    _bounded(r, f, value)
    return value


def _bool(r: Reader, f: Field, value: Any) -> bool:
    if not isinstance(value, bool):
        raise r.error(f.path, f"must be True or False, got {describe(value)}")
    return value


def _str(r: Reader, f: Field, value: Any) -> str | None:
    if value is None and f.accepts_none:
        return None
    if not isinstance(value, str):
        raise r.error(f.path, f"must be a string, got {describe(value)}")
    if f.choices and value not in f.choices:
        raise r.error(f.path, f"must be one of {', '.join(map(repr, f.choices))}, got {value!r}"
                              f"{suggest(value, f.choices)}")
    return value


def _ratio(r: Reader, f: Field, value: Any) -> float:
    """InternEvo's ``model.checkpoint``: True (1), False (0) or the fraction of layers to recompute."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and 0 <= value <= 1:
        return float(value)
    raise r.error(f.path, f"must be True, False or a fraction in [0, 1], got {value!r}")


def _dict(r: Reader, f: Field, value: Any) -> dict | None:
    if value is None and f.accepts_none:
        return None
    if not isinstance(value, dict):
        raise r.error(f.path, f"must be a dict, got {describe(value)}")
    return value


_KINDS: dict[str, Callable[[Reader, Field, Any], Any]] = {
    "int": _int, "count": _count, "float": _float, "bool": _bool, "str": _str, "ratio": _ratio, "dict": _dict,
    "any": lambda r, f, value: value,
}
