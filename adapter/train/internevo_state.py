"""Resume a training checkpoint InternEvo 0.5.2 wrote: its optimizer partitions, sampler and loss scale.

InternEvo's ``HybridZeroOptimizer`` keeps, per (tensor, pipeline) rank, the rank's parameters sorted by size
(largest first, ties in ``model.parameters()`` order) and dealt to the ZeRO ranks; each
``optimizer_tp{t}_pp{p}_zo{z}.pt`` holds its ZeRO rank's flat fp32 master copy and Adam's moments over it, and
``zero_devide_optim_plan`` names the parameters in it as ``"{sorted index}_{dim0}_{dim1}"``
(``INTERNEVO_FORMAT.md`` §7.5). The parameter order of a rank is its model file's key order (true of the
families whose state dict is their parameter order; InternLM1's ``Wqkv`` hook reorders its keys, so it is
refused here). Cutting the flat tensors back into parameters gives, per (tensor, pipeline) rank, three
dictionaries shaped exactly like the model file, which are written as the adapter's layout-free optimizer
folders (``train.optimizer_state``) and loaded from there at any layout.

The files are read with ``weights_only=True``: InternEvo's ``ParallelMode`` enum (in the optimizer's param
groups) is read as a stand-in that holds its value, and the sampler's numpy arrays through numpy's
allow-listed reconstructors; nothing else is let through.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.formats.internevo import MODEL_FILE, model_config_dict
from adapter.checkpoint.io.safe_load import load_tensors, megatron_globals
from adapter.config.schema import ModelConfig
from adapter.train.optimizer_state import FOLDER, STEPS_FILE

OPTIMIZER_FILE = re.compile(r"^optimizer_tp(\d+)_pp(\d+)_zo(\d+)\.pt$")
_PARALLEL_MODE = "internlm.core.context.process_group_initializer.ParallelMode"


class _ParallelMode:
    """What InternEvo's ``ParallelMode`` enum members in a param group are read as: their value only."""

    def __init__(self, value: str):
        self.value = value


def holds_optimizer(folder: Path) -> bool:
    return any(OPTIMIZER_FILE.match(p.name) for p in folder.iterdir())


def _load(path: Path, allowed: list) -> Any:
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a refused global or a damaged file: one line naming it
        raise CheckpointError(f"{path}: cannot be read as InternEvo's ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]})") from None


def _rank_states(folder: Path, t: int, p: int, zero: int, model: ModelConfig) -> tuple[dict, int, dict]:
    """``({"fp32"|"exp_avg"|"exp_avg_sq": {file key: tensor}}, Adam's step, grad scaler)`` of rank (t, p)."""
    if model.family == "internlm1":
        raise CheckpointError(f"{folder}: InternLM1's optimizer files cannot be read yet (its Wqkv state-dict hook "
                              "reorders the keys against the parameter order the partition plan follows)")
    shapes = {k: tuple(v.shape) for k, v in load_tensors(folder / f"model_tp{t}_pp{p}.pt").items()}
    by_size = sorted(shapes, key=lambda k: -int(np.prod(shapes[k], dtype=np.int64)))  # stable: ties keep order
    out: dict[str, dict[str, torch.Tensor]] = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    steps, scaler = set(), {}
    for z in range(zero):
        path = folder / f"optimizer_tp{t}_pp{p}_zo{z}.pt"
        sd = _load(path, [(_ParallelMode, _PARALLEL_MODE)])
        plan = sd["zero_devide_optim_plan"]
        if any(group[z] for group in plan[1:]):
            raise CheckpointError(f"{path}: parameters in optimizer groups other than 'default' are not read yet")
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
            key = by_size[index]
            if tuple(dims) != shapes[key]:
                raise CheckpointError(f"{path}: plan entry {name} does not fit {key} {shapes[key]} of the model file")
            n = int(np.prod(dims, dtype=np.int64))
            for kind, flat in flats.items():
                out[kind][key] = flat[offset:offset + n].detach().reshape(dims).clone()  # the fp32 flat requires grad
            offset += n
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
    """InternEvo's ``StaticBatchSampler`` state (numpy arrays in it) as the adapter's sampler reads it: the
    epoch's index array over all ranks and the generator after its shuffle; InternEvo's rank 0 writes it, and
    its ``num_consumed_samples_in_epoch`` counts one rank's rows (as the adapter's ``consumed`` does)."""
    from adapter.data.sampler import rng_to_saved

    s = _load(path, megatron_globals())
    return {"batch_count": int(s["batch_count"]), "consumed": int(s["num_consumed_samples_in_epoch"]),
            "epoch": int(s["epoch"]), "seed": int(s["seed"]), "data_world_size": int(s["data_world_size"]),
            "batch_size": int(s["batch_size"]),
            "indices": torch.from_numpy(np.asarray(s["indices"], dtype=np.int64)),
            "rng_state": rng_to_saved(s["rng_state"])}
