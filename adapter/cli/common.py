"""What every command line shares: argument types that refuse nonsense, and a quiet exit on a closed pipe."""

from __future__ import annotations

import argparse
import math
import os
import sys


def positive_int(text: str) -> int:
    """An argparse type for sizes (``--tp``, ``--world-size``): 0 or a negative number is a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def tolerance(text: str) -> float:
    """An argparse type for ``--atol``: a finite number ≥ 0 (``nan`` would make every comparison pass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def closed_pipe() -> int:
    """The reader of our output went away (``| head``): not an error. Point stdout at /dev/null so that
    Python's flush at exit does not fail again, and report success."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0
