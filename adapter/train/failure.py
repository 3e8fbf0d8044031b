"""What a training rank prints when it stops on an error nobody anticipated (a bug, or a component failing).

Anticipated errors (a bad config, bad data, a bad checkpoint, unusable storage) are one line already: the
message says what to fix. Anything else is reported the same way, one line on each rank that raised it, naming
the rank, the exception and where its traceback went: ``<run folder>/error_rank<r>.log`` (rewritten at each
launch), which is what a bug report needs. A rank whose collective failed because another rank died says only
that (``train: rank r stopped: another rank failed``), so the cause is the one error line. ``--verbose``
prints the traceback too; so does a run folder that cannot be written, since the traceback must go somewhere.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

MAX_LINE = 300
#: How gloo and NCCL say that another rank went away: on the other ranks, the consequence of its error.
PEER_GONE = ("closed by peer", "reset by peer", "remote process exited")


def first_line(exc: BaseException) -> str:
    """The exception's message cut to one line of at most ``MAX_LINE`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


def report_unexpected(exc: BaseException, rank: int, folder: Path, verbose: bool) -> None:
    """Write ``exc``'s traceback to ``folder/error_rank<rank>.log`` and print one line about it to stderr."""
    text = "".join(traceback.format_exception(exc))
    log: Path | None = folder / f"error_rank{rank}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log.write_text(text, encoding="utf-8")
    except OSError:
        log = None
    where = f"traceback in {log}" if log else f"the traceback follows: {folder} cannot be written"
    message = first_line(exc)
    if any(words in message for words in PEER_GONE):
        print(f"train: rank {rank} stopped: another rank failed ({where})", file=sys.stderr, flush=True)
    else:
        print(f"train: error (rank {rank}): unexpected {type(exc).__name__}{': ' + message if message else ''} "
              f"({where})", file=sys.stderr, flush=True)
    if verbose or log is None:
        print(text, file=sys.stderr, end="", flush=True)
