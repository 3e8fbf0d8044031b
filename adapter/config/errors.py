"""The one error type for bad configs: it names the field, and the file and line when known.

Messages quote values (``got ...``); a config value can be a megabyte long, so a message is cut at
``MAX_MESSAGE`` characters, whatever it quotes."""

from __future__ import annotations


MAX_MESSAGE = 1000


class ConfigError(ValueError):
    """A config is malformed or inconsistent.

    Args:
        field: dotted path of the offending field (``"parallel.tensor.size"``), or ``""`` for the file.
        message: a plain explanation of what is wrong and what would be right.
        source: the config file, when the error can be tied to one.
        line: the line in ``source`` where the field is written, when known.
    """

    def __init__(self, field: str, message: str, *, source: str | None = None, line: int | None = None):
        self.field = field
        self.message = message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 1] + "…"
        self.source = source
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = f"{self.source}:{self.line}: " if self.line else f"{self.source}: "
        what = f"{self.field}: " if self.field else ""
        return f"{where}{what}{self.message}"
