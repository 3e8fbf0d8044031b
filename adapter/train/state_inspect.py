"""What training state a checkpoint folder holds, read from file headers and small files only.

``internlm-ckpt inspect`` reports it as the ``state`` section, and ``internlm-ckpt convert`` checks it before
it writes anything (``train.state_convert``). Four kinds of folder:

* ``adapter``: written by this adapter's trainer (``train.state_files``): the optimizer state per logical
  tensor under ``optimizer/{fp32,exp_avg,exp_avg_sq}/`` (model folders at the layout that saved them) with
  Adam's step in ``optimizer/state.pt``, and ``context.pt`` (the grad scaler in it), ``sampler.pt``,
  ``schedulder.pt``, ``{step}.step``. A save before Adam's first step has no ``optimizer/``;
* ``internevo``: a training checkpoint InternEvo wrote (``train.internevo_state``): ``HybridZeroOptimizer``
  partitions ``optimizer_tp{t}_pp{p}_zo{z}.pt`` (the grad scaler in each), its own sampler and scheduler;
* ``deepspeed``: this adapter's earlier versions, with DeepSpeed's engine checkpoint under ``deepspeed/``,
  cut for the layout (and data-parallel size) that saved it;
* ``weights-only``: model files and nothing to resume.

Nothing large is loaded: model and optimizer files are memory-mapped, so only their pickled structure is
read (and Adam's step, one number); ``context.pt``, ``sampler.pt`` and ``schedulder.pt`` are a few KiB
(InternEvo's ``sampler.pt`` holds its epoch's index array, which is read whole, as InternEvo does). A file
that cannot be read is not an error here: it becomes one line in ``problems``, which ``convert`` refuses on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.safe_load import load_metadata
from adapter.train.internevo_state import OPTIMIZER_FILE, unread_optimizer
from adapter.train.optimizer_state import FOLDER, STATES, STEPS_FILE
from adapter.train.state_files import DEEPSPEED_TAG, completed_step

CONTEXT, SAMPLER, SCHEDULES = "context.pt", "sampler.pt", "schedulder.pt"
"""The small state files (``schedulder.pt`` is InternEvo's spelling)."""
SAMPLER_KEYS = ("batch_count", "consumed", "epoch", "seed", "data_world_size")
"""What the adapter's ``BatchSampler.load_state_dict`` reads from any ``sampler.pt`` state."""


@dataclass
class TrainingState:
    """A folder's training state as ``inspect`` reports it (``info``), and what stops it from resuming."""

    folder: Path
    kind: str
    """``adapter``, ``internevo``, ``deepspeed`` or ``weights-only``."""
    step: Optional[int]
    """The step of the newest ``{step}.step`` marker; None when the save did not finish."""
    info: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """One line per file that is missing, unreadable or inconsistent, naming it."""


def training_kind(folder: Path) -> str:
    """The kind of ``folder`` (module docstring), from its file names alone."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if any(OPTIMIZER_FILE.match(n) for n in names):
        return "internevo"
    if (folder / FOLDER).is_dir():
        return "adapter"
    if (folder / DEEPSPEED_TAG).is_dir():
        return "deepspeed"
    if CONTEXT in names or SAMPLER in names:
        return "adapter"
    return "weights-only"


def _json(value: Any) -> Any:
    """A JSON-friendly copy: 0-d tensors as numbers; tensors, arrays and objects as a short description."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else f"tensor{list(value.shape)}"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return type(value).__name__


def _scalars(d: dict) -> dict:
    """The plain entries of a state dict (numbers, strings, lists of numbers), not nested states or arrays."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (bool, int, float, str)) or v is None or (isinstance(v, torch.Tensor) and v.numel() == 1):
            out[str(k)] = _json(v)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float)) for x in v):
            out[str(k)] = list(v)
    return out


def _read(state: TrainingState, path: Path, reader: Callable[[Path], Any], required: tuple[str, ...] = ()) -> Any:
    """``reader(path)``, or None with one line in ``state.problems`` when it is missing, unreadable, or lacks a
    ``required`` key (what a resume reads from it)."""
    if not path.exists():
        state.problems.append(f"{path}: missing")
        return None
    try:
        value = reader(path)
    except Exception as exc:  # a damaged or refused pickle: unpickling errors vary
        first_line = next(iter(str(exc).splitlines()), "")
        state.problems.append(f"{path}: cannot be read ({type(exc).__name__}: {first_line})")
        return None
    if not isinstance(value, dict):
        state.problems.append(f"{path}: holds a {type(value).__name__}, not a state dict")
        return None
    missing = [k for k in required if k not in value]
    if missing:
        state.problems.append(f"{path}: no {', '.join(missing)} in it, which a resume reads")
        return None
    return value


def _load_tensors_file(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _sampler_info(s: dict) -> dict:
    keys = ("batch_count", "consumed", "data_world_size", "epoch", "batch_size", "num_samples")
    return {k: _json(s[k]) for k in keys if k in s}


def read_state(folder: str | Path) -> TrainingState:
    """What training state ``folder`` holds (headers and small files only; see the module docstring)."""
    folder = Path(folder)
    state = TrainingState(folder, training_kind(folder), completed_step(folder))
    state.info = {"kind": state.kind, "step": state.step}
    if state.kind == "weights-only":
        return state
    unread = unread_optimizer(folder)
    if unread is not None:
        state.problems.append(f"{unread} (resume it with ckpt.load_optimizer=False, or convert with --weights-only)")
    state.info["complete"] = state.step is not None
    if state.step is None:
        state.problems.append(f"{folder}: no {{step}}.step marker: the save did not finish (interrupted, or still "
                              "being written), so this is not a complete checkpoint")
    if state.kind == "internevo":
        _internevo(state)
    else:
        _adapter(state)
    context = state.info.get("context")
    if context and state.step is not None and context.get("step_count") not in (None, state.step):
        state.problems.append(f"{folder / CONTEXT}: step_count {context['step_count']} disagrees with the marker "
                              f"{state.step}.step")
    state.info["problems"] = state.problems
    return state


def _adapter(state: TrainingState) -> None:
    """This adapter's folders (and the ``deepspeed/`` ones of earlier versions)."""
    from adapter.checkpoint.formats.internevo import read_internevo

    folder = state.folder
    context = _read(state, folder / CONTEXT, load_metadata, required=("step_count",))
    if context is not None:
        state.info["context"] = _scalars(context)
        state.info["grad_scaler"] = _json(context.get("grad_scaler"))
    sampler = _read(state, folder / SAMPLER, _load_tensors_file, required=SAMPLER_KEYS)
    state.info["sampler"] = _sampler_info(sampler) if sampler is not None else None
    schedules = _read(state, folder / SCHEDULES, load_metadata)
    state.info["schedules"] = _scalars(schedules) if schedules is not None else None
    if state.kind == "deepspeed":
        files = sorted(p.relative_to(folder).as_posix() for p in (folder / DEEPSPEED_TAG).rglob("*") if p.is_file())
        state.info["optimizer"] = {"format": "deepspeed", "files": len(files),
                                   "note": "DeepSpeed's own ZeRO files (earlier versions): they resume only at the "
                                           "layout and data-parallel size that saved them"}
        return
    root = folder / FOLDER
    if not root.is_dir():
        state.info["optimizer"] = None  # saved before Adam's first step: a resume starts Adam afresh
        return
    optimizer: dict[str, Any] = {"format": "adapter", "states": [k for k in STATES if (root / k).is_dir()]}
    steps = _read(state, root / STEPS_FILE, load_metadata)
    optimizer["adam_steps"] = _json(steps.get("steps")) if steps is not None else None
    for kind in STATES:
        if not (root / kind).is_dir():
            state.problems.append(f"{root / kind}: missing (the optimizer folder holds {optimizer['states']})")
            continue
        try:
            saved = read_internevo(root / kind)
        except CheckpointError as exc:
            state.problems.append(str(exc))
            continue
        layout = {"tp": saved.tp, "pp": saved.pp, "vpp": saved.num_chunks, "dtype": str(saved.dtype).split(".")[-1]}
        if "tp" not in optimizer:
            optimizer.update(layout)
        elif any(optimizer[k] != v for k, v in layout.items()):
            state.problems.append(f"{root / kind}: saved at {layout}, the other states at "
                                  f"{ {k: optimizer[k] for k in layout} }")
    state.info["optimizer"] = optimizer


def _fused(state: TrainingState, plan: Any) -> Optional[bool]:
    """Whether InternEvo's plan partitions the MLPs' ``w1``/``w3`` as one parameter (``mlp_layer_fusion``),
    from the plan of ``(tp 0, pp 0)`` against its model file's keys; None where it cannot tell."""
    from adapter.checkpoint.formats.internevo import read_internevo
    from adapter.train.internevo_state import plan_parameters

    path = state.folder / "optimizer_tp0_pp0_zo0.pt"
    try:
        ckpt = read_internevo(state.folder)
        shapes = {k: tuple(v.shape) for k, v in ckpt.load_file(0, 0).items()}
        return any(len(p.keys) > 1 for p in plan_parameters(path, plan, shapes, ckpt.family))
    except (CheckpointError, TypeError, IndexError) as exc:
        state.problems.append(str(exc) if isinstance(exc, CheckpointError) else f"{path}: no ZeRO plan it can read")
        return None


def _internevo(state: TrainingState) -> None:
    """InternEvo's own training checkpoint: its ZeRO partitions' layout, Adam's step and the grad scaler."""
    from adapter.train.internevo_state import PARALLEL_MODE, ParallelMode, sampler_state

    folder = state.folder
    ranks = sorted((int(m[1]), int(m[2]), int(m[3])) for p in folder.iterdir() if (m := OPTIMIZER_FILE.match(p.name)))
    tp, pp, zero = (max(r[i] for r in ranks) + 1 for i in range(3))
    optimizer: dict[str, Any] = {"format": "internevo", "tp": tp, "pp": pp, "zero1": zero, "files": len(ranks)}
    if len(ranks) != tp * pp * zero:
        have = {(t, p, z) for t, p, z in ranks}
        gone = next((t, p, z) for t in range(tp) for p in range(pp) for z in range(zero) if (t, p, z) not in have)
        state.problems.append(f"{folder / 'optimizer_tp{}_pp{}_zo{}.pt'.format(*gone)}: missing (found files of "
                              f"tp={tp}, pp={pp}, zero1={zero})")

    def header(path: Path) -> Any:
        with torch.serialization.safe_globals([(ParallelMode, PARALLEL_MODE)]):
            return _load_tensors_file(path)

    first = _read(state, folder / "optimizer_tp0_pp0_zo0.pt", header)
    if first is not None:
        adam = (first.get("base_optim_states") or {}).get("state") or {}
        group = adam.get(0, {})
        optimizer["states"] = ["fp32"] * ("flat_fp32_weights" in first) + [k for k in STATES[1:] if k in group]
        optimizer["adam_step"] = int(group["step"]) if "step" in group else None
        optimizer["mlp_layer_fusion"] = _fused(state, first.get("zero_devide_optim_plan"))
        state.info["grad_scaler"] = _json(first.get("grad_scaler"))
    state.info["optimizer"] = optimizer
    context = _read(state, folder / CONTEXT, load_metadata)
    state.info["context"] = _scalars(context) if context is not None else None
    sampler = _read(state, folder / SAMPLER, sampler_state)
    state.info["sampler"] = _sampler_info(sampler) if sampler is not None else None
    schedules = _read(state, folder / SCHEDULES, load_metadata)
    state.info["schedules"] = _scalars(schedules) if schedules is not None else None
