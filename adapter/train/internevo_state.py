"""Resume a training checkpoint InternEvo 0.5.2 wrote: its optimizer partitions, sampler and loss scale.

InternEvo's ``HybridZeroOptimizer`` keeps, per (tensor, pipeline) rank, the rank's parameters sorted by size
(largest first, ties in ``model.parameters()`` order) and dealt to the ZeRO ranks; each
``optimizer_tp{t}_pp{p}_zo{z}.pt`` holds its ZeRO rank's flat fp32 master copy and Adam's moments over it, and
``zero_devide_optim_plan`` names the parameters in it as ``"{sorted index}_{dim0}_{dim1}"``
(``INTERNEVO_FORMAT.md`` §7.5). The sorted index counts in ``model.parameters()`` order, which is the model
file's key order except in InternLM1, whose ``Wqkv`` save hook moves keys (``parameter_order``), and in runs
with ``mlp_layer_fusion``, whose MLPs hold ``w1`` and ``w3`` as one parameter (``parameters``; such a run is
recognised by its plan). Cutting the flat tensors back into parameters gives, per (tensor, pipeline) rank,
three dictionaries shaped exactly like the model file, which are written as the adapter's layout-free
optimizer folders (``train.optimizer_state``) and loaded from there at any layout. Only the ``default``
parameter group is read: the only other group InternEvo makes for the configs the adapter runs, ``fp32``, is
empty unless ``use_fp32_norm=True`` (``INTERNEVO_FORMAT.md`` §7.1), which the adapter does not train.

The files are read with ``weights_only=True``: InternEvo's ``ParallelMode`` enum (in the optimizer's param
groups) is read as a stand-in that holds its value, and the sampler's numpy arrays through numpy's
allow-listed reconstructors; nothing else is let through.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.formats.internevo import MLP_KEY, MODEL_FILE, model_config_dict
from adapter.checkpoint.io.safe_load import load_metadata, load_tensors, megatron_globals
from adapter.config.schema import InternLMConfig, ModelConfig
from adapter.train.optimizer_state import FOLDER, STEPS_FILE

OPTIMIZER_FILE = re.compile(r"^optimizer_tp(\d+)_pp(\d+)_zo(\d+)\.pt$")
#: InternEvo's other optimizer files, which are not read here: a weight-parallel (``isp``) run's, one per rank
#: (``optimizer_tp{t}_wp{w}_pp{p}_dp{d}.pt``), and those of InternEvo versions after 0.5.2
#: (``optimizer_wp{w}_pp{p}_zo{z}.pt``)
UNREAD_OPTIMIZER_FILE = re.compile(r"^optimizer_(tp\d+_wp\d+_pp\d+_dp\d+|wp\d+_pp\d+_zo\d+)\.pt$")
PARALLEL_MODE = "internlm.core.context.process_group_initializer.ParallelMode"


class ParallelMode:
    """What InternEvo's ``ParallelMode`` enum members in a param group are read as: their value only.

    ``train.internevo_export`` writes instances back under InternEvo's name (``PARALLEL_MODE``), the way
    pickle writes an ``Enum`` member: the class, called with the value."""

    def __init__(self, value: str):
        self.value = value

    def __reduce__(self) -> tuple:
        return ParallelMode, (self.value,)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParallelMode) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"ParallelMode({self.value!r})"


#: InternLM1's attention keys, in the order InternEvo 0.5.2 registers the parameters: ``MHA.__init__``
#: creates ``wqkv`` (``model/modules/mha.py:107``) before ``out_proj`` (``:117``), and ``InternLM1Decoder``
#: (``model/modeling_internlm.py:109``) registers ``internlm1_mha_save_convert`` (``model/utils.py:16-22``) as
#: the mixer's state-dict hook, which pops ``wqkv.weight``/``wqkv.bias`` and re-inserts them as ``Wqkv.*``
#: after ``out_proj.*``. So the model file lists ``out_proj`` first while ``model.parameters()`` (and the
#: ZeRO plan's sorted index) has ``Wqkv`` first.
_INTERNLM1_MIXER = re.compile(r"^(.*\bmixer\.)(Wqkv|out_proj)\.(weight|bias)$")
_MIXER_ORDER = ("Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias")


def parameter_order(keys: list[str], family: str) -> list[str]:
    """A model file's keys in InternEvo's ``model.parameters()`` order: the file order, except that each
    InternLM1 mixer's ``Wqkv`` comes before its ``out_proj`` (see ``_MIXER_ORDER``)."""
    out = list(keys)
    if family != "internlm1":
        return out
    slots: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if m := _INTERNLM1_MIXER.match(key):
            slots.setdefault(m[1], []).append(i)
    for prefix, where in slots.items():
        ordered = sorted((keys[i] for i in where), key=lambda k: _MIXER_ORDER.index(k[len(prefix):]))
        for i, key in zip(where, ordered):
            out[i] = key
    return out


@dataclass(frozen=True)
class Parameter:
    """One of InternEvo's parameters of a (tensor, pipeline) rank: the model file's ``keys`` it holds,
    stacked on dim 0 (``w1`` then ``w3`` for a fused MLP, else one key), and its shape."""

    name: str
    shape: tuple[int, ...]
    keys: tuple[str, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def parameters(shapes: dict[str, tuple[int, ...]], family: str, mlp_layer_fusion: bool) -> list[Parameter]:
    """InternEvo's parameters of one (tensor, pipeline) rank, in ``model.parameters()`` order, from its model
    file's keys and shapes (``parameter_order``). With ``mlp_layer_fusion``, InternEvo 0.5.2's
    ``FeedForward`` (``model/modules/mlp.py:84-85``) registers ``fused_w1_w3`` (``[w1; w3]`` of this tensor
    rank, ``:28``) and then ``w2``; its state-dict hook splits it back into ``w1`` and ``w3`` after ``w2``
    in the file (``:34-40``)."""
    out: list[Parameter] = []
    fused: set[str] = set()
    for key in parameter_order(list(shapes), family):
        m = MLP_KEY.match(key) if mlp_layer_fusion else None
        if m is None:
            out.append(Parameter(key, shapes[key], (key,)))
        elif m[1] not in fused:
            fused.add(m[1])
            w1, w2, w3 = (f"{m[1]}{w}.weight" for w in ("w1", "w2", "w3"))
            if not all(k in shapes for k in (w1, w2, w3)):
                raise CheckpointError(f"{m[1]}: an MLP without all of w1, w2 and w3 cannot be fused")
            out.append(Parameter(f"{m[1]}fused_w1_w3.weight", (shapes[w1][0] + shapes[w3][0], *shapes[w1][1:]),
                                 (w1, w3)))
            out.append(Parameter(w2, shapes[w2], (w2,)))
    return out


def by_size(params: list[Parameter]) -> list[Parameter]:
    """``params`` (in parameter order) as HybridZeroOptimizer sorts them before dealing them to the ZeRO
    ranks: by element count, largest first, ties in parameter order (``sorted`` is stable)."""
    return sorted(params, key=lambda p: -p.numel)


def holds_optimizer(folder: Path) -> bool:
    return any(OPTIMIZER_FILE.match(p.name) for p in folder.iterdir())


def unread_optimizer(folder: Path) -> Optional[str]:
    """Where ``folder`` holds InternEvo optimizer files this adapter does not read (``UNREAD_OPTIMIZER_FILE``)
    and none it reads, a line naming one; else None. Resumed as it is, such a run would start Adam afresh
    while its counters go on."""
    if holds_optimizer(folder):
        return None
    unread = next((p for p in sorted(folder.iterdir()) if UNREAD_OPTIMIZER_FILE.match(p.name)), None)
    return None if unread is None else (f"{unread}: InternEvo's optimizer state of a weight-parallel (isp) run or "
                                        "of a later InternEvo, which cannot be read here")


def _load(path: Path, allowed: list) -> Any:
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a refused global or a damaged file: one line naming it
        raise CheckpointError(f"{path}: cannot be read as InternEvo's ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]})") from None


def plan_parameters(path: Path, plan: list, shapes: dict[str, tuple[int, ...]], family: str) -> list[Parameter]:
    """The parameters a ZeRO plan numbers, sorted as InternEvo did: those of the model file, with each MLP's
    ``w1`` and ``w3`` fused where the plan counts one parameter fewer per MLP (a ``mlp_layer_fusion`` run;
    the plan's shapes then say the same)."""
    count = sum(len(ids) for ids in plan[0])
    plain, fused = parameters(shapes, family, False), parameters(shapes, family, True)
    for params in (plain, fused):
        if count == len(params):
            return by_size(params)
    raise CheckpointError(f"{path}: the plan lists {count} parameters; the model file's tensors make "
                          f"{len(plain)} ({len(fused)} with InternEvo's mlp_layer_fusion)")


def _rank_states(folder: Path, t: int, p: int, zero: int, model: ModelConfig) -> tuple[dict, int, dict]:
    """``({"fp32"|"exp_avg"|"exp_avg_sq": {file key: tensor}}, Adam's step, grad scaler)`` of rank (t, p)."""
    shapes = {k: tuple(v.shape) for k, v in load_tensors(folder / f"model_tp{t}_pp{p}.pt").items()}
    out: dict[str, dict[str, torch.Tensor]] = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    steps, scaler = set(), {}
    ordered: list[Parameter] = []  # from the first file's plan: every ZeRO rank's file holds the whole plan
    for z in range(zero):
        path = folder / f"optimizer_tp{t}_pp{p}_zo{z}.pt"
        sd = _load(path, [(ParallelMode, PARALLEL_MODE)])
        plan = sd["zero_devide_optim_plan"]
        for i, group in enumerate(plan[1:], 1):
            if group[z]:
                name = sd["base_optim_states"]["param_groups"][i].get("name", i)
                raise CheckpointError(f"{path}: optimizer group '{name}' holds parameters (InternEvo's fp32 group "
                                      "with use_fp32_norm=True); only the 'default' group is read")
        ordered = ordered or plan_parameters(path, plan, shapes, model.family)
        ids, scaler = plan[0][z], sd["grad_scaler"]
        if not ids:
            continue
        state = sd["base_optim_states"]["state"].get(0)
        if state is None:
            raise CheckpointError(f"{path}: no Adam state (saved before the first update)")
        flats = {"fp32": sd["flat_fp32_weights"][0], "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
        steps.add(int(state["step"]))
        offset = 0
        for name in ids:
            index, *dims = (int(x) for x in name.split("_"))
            if index >= len(ordered):
                raise CheckpointError(f"{path}: plan entry {name} is past the {len(ordered)} parameters of the "
                                      "model file")
            param = ordered[index]
            if tuple(dims) != param.shape:
                raise CheckpointError(f"{path}: plan entry {name} does not fit {param.name} {param.shape} of the "
                                      "model file")
            rows = [shapes[k][0] for k in param.keys]
            for kind, flat in flats.items():  # the fp32 flat requires grad
                value = flat[offset:offset + param.numel].detach().reshape(dims)
                for key, piece in zip(param.keys, value.split(rows)):
                    out[kind][key] = piece.clone()
            offset += param.numel
        if offset != flats["fp32"].numel():
            raise CheckpointError(f"{path}: the plan covers {offset} of {flats['fp32'].numel()} elements")
    missing = [k for k in shapes if k not in out["fp32"]]
    if missing:
        raise CheckpointError(f"{folder}: no optimizer state for {missing[0]} (tp {t}, pp {p}) in any ZeRO rank")
    if len(steps) != 1:
        raise CheckpointError(f"{folder}: the ZeRO ranks of tp {t}, pp {p} are at different steps {sorted(steps)}")
    return {kind: {k: d[k] for k in shapes} for kind, d in out.items()}, steps.pop(), scaler


def import_optimizer(folder: Path, model: ModelConfig, target: Path) -> dict:
    """Write InternEvo's optimizer state of ``folder`` into ``target/optimizer`` in the adapter's form;
    returns InternEvo's grad-scaler state."""
    ranks = {(int(m[1]), int(m[2]), int(m[3])) for p in folder.iterdir() if (m := OPTIMIZER_FILE.match(p.name))}
    tp, pp, zero = (max(r[i] for r in ranks) + 1 for i in range(3))
    if len(ranks) != tp * pp * zero:
        raise CheckpointError(f"{folder}: optimizer files for tp={tp}, pp={pp}, zero1={zero} are incomplete")
    if not {(int(m[1]), int(m[2])) for p in folder.iterdir() if (m := MODEL_FILE.match(p.name))} >= \
            {(t, p) for t in range(tp) for p in range(pp)}:
        raise CheckpointError(f"{folder}: the optimizer files need their model_tp*_pp*.pt beside them")
    steps, scaler = set(), {}
    for t in range(tp):
        for p in range(pp):
            states, step, scaler = _rank_states(folder, t, p, zero, model)
            steps.add(step)
            for kind, tensors in states.items():
                out = target / FOLDER / kind
                out.mkdir(parents=True, exist_ok=True)
                torch.save(tensors, out / f"model_tp{t}_pp{p}.pt")
                torch.save(model_config_dict(model), out / "model_config.pt")
    if len(steps) != 1:
        raise CheckpointError(f"{folder}: the optimizer files are at different steps {sorted(steps)}")
    torch.save({"steps": [steps.pop()]}, target / FOLDER / STEPS_FILE)
    return scaler


def sampler_state(path: Path) -> dict:
    """InternEvo's ``StaticBatchSampler`` state (numpy arrays in it) as the adapter's sampler reads it.

    InternEvo's ``rng_state`` is the generator *before* the epoch's shuffle (``indices`` is that shuffle,
    truncated to whole global batches) and its loader rebuilds the epoch from it, ignoring ``indices``; the
    adapter's own state names an epoch the same way (``epoch_rng_state``, ``epoch_size``), so the epoch is
    shuffled again here too and the next epoch's shuffle starts where InternEvo's would. Rank 0 writes the
    file; ``num_consumed_samples_in_epoch`` counts one rank's rows (as the adapter's ``consumed`` does)."""
    from adapter.data.sampler import rng_to_saved

    s = _load(path, megatron_globals())
    return {"batch_count": int(s["batch_count"]), "consumed": int(s["num_consumed_samples_in_epoch"]),
            "epoch": int(s["epoch"]), "seed": int(s["seed"]), "data_world_size": int(s["data_world_size"]),
            "batch_size": int(s["batch_size"]), "epoch_size": len(s["indices"]),
            "epoch_rng_state": rng_to_saved(s["rng_state"])}


def _epoch_rows(indices: np.ndarray, rng_state: tuple, global_batch: int, where: Path) -> int:
    """The packed-row count whose shuffle from ``rng_state`` begins with ``indices`` (InternEvo's sampler file
    does not record it). An epoch keeps whole global batches, so it lies between the largest index + 1 and
    ``len(indices) + global_batch - 1``; nearly always the first candidate (one shuffle) is it."""
    for rows in range(int(indices.max(initial=-1)) + 1, len(indices) + global_batch):
        generator = np.random.RandomState()
        generator.set_state(rng_state)
        order = np.arange(rows, dtype=np.int64)
        generator.shuffle(order)
        if np.array_equal(order[:len(indices)], indices):
            return rows
    raise CheckpointError(f"{where}: its indices are no shuffle of the data from its rng_state")


def imported_sampler(path: Path) -> dict:
    """InternEvo's ``sampler.pt`` as the adapter's: its state (``sampler_state``) and the epoch's row count,
    which the adapter's sampler keeps and InternEvo's does not (found from its index array)."""
    from adapter.data.sampler import rng_from_saved

    sampler = sampler_state(path)
    indices = np.asarray(_load(path, megatron_globals())["indices"], dtype=np.int64)
    global_batch = sampler["batch_size"] * sampler["data_world_size"]
    sampler["num_samples"] = _epoch_rows(indices, rng_from_saved(sampler["epoch_rng_state"]), global_batch, path)
    return sampler


def import_checkpoint(folder: Path, cfg: InternLMConfig, target: Path) -> Path:
    """Write InternEvo's training checkpoint ``folder`` as an adapter training checkpoint into ``target``, a
    new or empty folder (``train.state_files``): model files, per-tensor optimizer state, context (with the loss
    scale), sampler (with the epoch's row count), schedule step and the run's optimizer settings, marker last.
    ``cfg`` is the run's config (InternEvo's files do not hold all of its settings)."""
    import shutil

    from adapter.train.internevo_export import RunSettings
    from adapter.train.state_files import completed_step

    step = completed_step(folder)
    if step is None:
        raise CheckpointError(f"{folder}: not a complete InternEvo checkpoint (no <step>.step marker)")
    target.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if MODEL_FILE.match(path.name):
            shutil.copyfile(path, target / path.name)
    torch.save(model_config_dict(cfg.model), target / "model_config.pt")
    scaler = import_optimizer(folder, cfg.model, target)
    context = {**load_metadata(folder / "context.pt"), "grad_scaler": scaler}
    torch.save(context, target / "context.pt")
    torch.save(imported_sampler(folder / "sampler.pt"), target / "sampler.pt")
    torch.save({"step_count": step, "base_lr": cfg.adam.lr, "internevo": RunSettings.from_config(cfg).to_dict()},
               target / "schedulder.pt")
    torch.save({"step": step}, target / f"{step}.step")
    return target
