"""Values InternEvo writes as strings with a grammar of their own, read into structured values (torch-free).

A field row names one of these as its ``parse``; each raises ``ValueError`` with the message the user sees
after the field's name.
"""

from __future__ import annotations

from typing import Any


def rampup_batch_size(value: Any) -> tuple[int, int, int] | None:
    """``"start increment every"`` in micro-batches; ``""`` or ``None`` disables ramp-up."""
    if value in ("", None):
        return None
    parts = value.split() if isinstance(value, str) else None
    if not parts or len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"must be '' or three space-separated integers 'start increment every', got {value!r}")
    start, incr, every = (int(p) for p in parts)
    if start < 1 or every < 1:
        raise ValueError(f"start and every must be >= 1, got {value!r}")
    return start, incr, every


def skip_batches(value: Any) -> tuple[tuple[int, int], ...]:
    """``"100-200,350"`` → inclusive ``batch_count`` ranges ``((100, 200), (350, 350))``."""
    if value in ("", None):
        return ()
    if not isinstance(value, str):
        raise ValueError(f"must be a string like '100-200,350', got {value!r}")
    ranges = []
    for piece in value.split(","):
        piece = piece.strip()
        bounds = piece.split("-")
        if not piece or len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise ValueError(f"cannot read {piece!r} in {value!r}; use ranges like '100-200,350'")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if hi < lo:
            raise ValueError(f"range {piece!r} ends before it starts")
        ranges.append((lo, hi))
    return tuple(ranges)


#: InternEvo's accepted dtype strings (``launch.py:267-288``) → (dtype, tf32).
DTYPES = {
    "torch.bfloat16": ("bf16", False),
    "torch.float16": ("fp16", False),
    "torch.half": ("fp16", False),
    "torch.float32": ("fp32", False),
    "torch.tf32": ("fp32", True),
}


def dtype(value: str) -> tuple[str, bool]:
    """``"torch.tf32"`` → ``("fp32", True)``: fp32 parameters with TF32 matmuls, as InternEvo sets them up."""
    return DTYPES[value]


def norm_type(value: str) -> str:
    """InternEvo's ``new_layer_norm`` builds RMSNorm for ``"rmsnorm"`` and LayerNorm for anything else."""
    return "rmsnorm" if value == "rmsnorm" else "layernorm"
