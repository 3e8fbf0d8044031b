"""InternEvo's variant spellings of one setting, rewritten to the one ``fields.FIELDS`` reads (torch-free).

InternEvo 0.5.2 (``args_sanity_check``) accepts each of these and collapses it the same way:

* ``zero1=8``, ``tensor=2``, ``pipeline=2``, ``weight=2``: an int is short for ``dict(size=...)``;
* ``parallel.sequence_parallel=True`` (InternLM 2023 configs) next to a tensor size without a ``mode``: Megatron
  sequence parallelism, mode ``"msp"`` (0.5.2 would silently force it off with the implied ``"mtp"``; we keep
  what the config meant);
* ``hybrid_zero_optimizer.zero_overlap_communication``: the old name of ``overlap_sync_grad``;
* ``model.adapt_hf``: ``qk_interleaved = not adapt_hf``; both given must agree.

The result maps each canonical key to ``(value, key as written)``, so errors name what the user wrote.
"""

from __future__ import annotations

from typing import Any

from adapter.config.reader import MISSING, Reader, describe

_SIZED = ("parallel.zero1", "parallel.tensor", "parallel.pipeline", "parallel.weight")


def canonical(r: Reader) -> dict[str, tuple[Any, str]]:
    """Canonical key → (value, key as written) for every setting ``r``'s file writes in another spelling."""
    out: dict[str, tuple[Any, str]] = {}
    for path in _SIZED:
        value = r.lookup(path)
        if value is not MISSING and not isinstance(value, dict):
            out[f"{path}.size"] = (value, path)
    if r.lookup("parallel.sequence_parallel") is True and r.lookup("parallel.tensor.mode") is MISSING:
        out["parallel.tensor.mode"] = ("msp", "parallel.sequence_parallel")
    _alias(r, out, "hybrid_zero_optimizer.zero_overlap_communication", "hybrid_zero_optimizer.overlap_sync_grad")
    adapt_hf = r.lookup("model.adapt_hf")
    if adapt_hf is not MISSING:
        if not isinstance(adapt_hf, bool):
            raise r.error("model.adapt_hf", f"must be True or False, got {describe(adapt_hf)}")
        qk_interleaved = r.lookup("model.qk_interleaved")
        if qk_interleaved is MISSING:
            out["model.qk_interleaved"] = (not adapt_hf, "model.adapt_hf")
        elif qk_interleaved is adapt_hf:
            raise r.error("model.qk_interleaved", "contradicts model.adapt_hf (qk_interleaved must equal not adapt_hf)")
    return out


def _alias(r: Reader, out: dict[str, tuple[Any, str]], old: str, new: str) -> None:
    """The old name counts only when the new one is not written."""
    value = r.lookup(old)
    if value is not MISSING and r.lookup(new) is MISSING:
        out[new] = (value, old)
