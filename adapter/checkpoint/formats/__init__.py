"""Checkpoint formats as plug-ins: one module per format, the same verbs in each, one registry.

A format module declares ``NAME`` (the ``--to`` value), ``HELP``, ``NEEDS_LAYOUT`` (whether its files are
cut for one TP/PP/VPP layout) and five functions:

* ``detect(names)``: whether a folder holding these file names is in this format;
* ``open_folder(path, model)``: ``(model, saved layout or None, logical tensors read lazily, generation)``;
* ``planned_files(layout)``: the files a conversion would write (``--dry-run``);
* ``file_groups(model, layout, meta, shard_bytes)``: the files to write, as ``stream_convert.FileGroup``s;
* ``finish(folder, model, groups, meta)``: the small files written after the tensors.

Adding a format is one module plus a line in ``REGISTRY``; detection, ``--to`` choices, ``--dry-run`` and
the converter look it up here. Detection tries formats in registry order.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: ``--to`` value → module in this package, in detection order (importing a format imports torch, so the
#: CLI's argument parser reads only these names)
REGISTRY = {"internevo": "internevo", "mcore": "mcore", "mcore-legacy": "mcore_legacy", "hf": "hf"}


def get(name: str) -> ModuleType:
    """The format module called ``name`` (a ``--to`` value)."""
    return importlib.import_module(f"adapter.checkpoint.formats.{REGISTRY[name]}")


def detect(names: set[str]) -> ModuleType | None:
    """The format of a folder holding files called ``names``."""
    return next((f for f in map(get, REGISTRY) if f.detect(names)), None)
