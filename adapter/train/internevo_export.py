"""Hand a run back to InternEvo 0.5.2: write its full training state from an adapter checkpoint.

An adapter checkpoint (``train.state_files``) keeps the optimizer state per logical tensor, so it can be
cut for any layout. InternEvo resumes only from its own files, at the layout they name
(``INTERNEVO_FORMAT.md`` §1.2, §1.4, §7.5), so this writes, for a tensor/pipeline/ZeRO-1 layout:

* ``model_tp{t}_pp{p}.pt`` (and ``topo_tp{t}_pp{p}.json``, a pickled ``{}``) as ``internlm-ckpt`` writes them;
* ``optimizer_tp{t}_pp{p}_zo{z}.pt``: ``HybridZeroOptimizer.state_dict()``. Each (t, p) rank's parameters,
  in ``model.parameters()`` order (``internevo_state.parameters``: with ``model.mlp_layer_fusion`` each
  MLP's ``w1`` and ``w3`` are one parameter ``[w1; w3]``, as InternEvo holds them), are sorted by element count
  (largest first, ties in order) and each goes to the ZeRO rank holding the fewest elements so far (the
  first such); a rank's fp32 master weights and Adam moments are those parameters flattened in that order.
  The plan names them ``"{sorted index}_{dim0}_{dim1}..."``. Groups: ``default`` with every parameter and
  the empty ``fp32`` group InternEvo always adds (``use_fp32_norm`` is off in runs the adapter trains);
  ``optimizer_mode`` is InternEvo's ``ParallelMode.ZERO1``, pickled by name (``save``);
* ``gpus-{W}_wp-0_tp-{t}_dp-{d}_pp-{p}_zo-{z}.pt``: the plan again, one file per global rank;
* ``sampler.pt`` (numpy arrays, as InternEvo's sampler holds them; for another data-parallel size than the
  saved run's, regrouped with the global batch kept: ``regroup_sampler``), ``schedulder.pt`` (InternEvo's
  ``FineTuneCosineAnnealingWarmupLR`` state at this step), ``context.pt`` (``TrainState``),
  ``model_config.pt`` and ``{step}.step`` last.

InternEvo checks, on load, that the ZeRO/tensor/pipeline sizes and the sampler's data-parallel size, seed and
ramp-up equal its run's, and copies the flat tensors by shape only: a plan that differed from its own
partition would scramble the state silently, which is why the partition is InternEvo's exactly. The values
InternEvo keeps beside the state (AdamW's settings, the schedules, the ramp-up string) come from the run's
config, which the adapter records in its ``schedulder.pt`` (``RunSettings``), or from ``--config``.
"""

from __future__ import annotations

import dataclasses
import pickle
import types
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from adapter.checkpoint.errors import CheckpointError
from adapter.config.schema import AdamConfig, Beta2SchedulerConfig, InternLMConfig, LRSchedulerConfig, ModelConfig
from adapter.runtime.layout import ParallelLayout
from adapter.train.internevo_state import PARALLEL_MODE, Parameter, ParallelMode, by_size, parameters
from adapter.train.optimizer_state import FOLDER, STATES, STEPS_FILE

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SizeError(CheckpointError):
    """A ZeRO-1 or data-parallel size the run cannot be handed back at."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What InternEvo's optimizer, scheduler and sampler files hold besides the training state: the run's
    AdamW settings and schedules, the ``data.rampup_batch_size`` string (InternEvo's sampler refuses a state
    saved with another one) and the ZeRO-1 size (``<= 0``: the whole data-parallel group)."""

    adam: AdamConfig
    lr_scheduler: LRSchedulerConfig
    beta2_scheduler: Beta2SchedulerConfig
    rampup: Optional[str]
    zero1: int
    mlp_layer_fusion: bool

    @classmethod
    def from_config(cls, cfg: InternLMConfig) -> RunSettings:
        return cls(cfg.adam, cfg.lr_scheduler, cfg.beta2_scheduler, cfg.given.get("data.rampup_batch_size", ""),
                   cfg.parallel.zero1_size, cfg.model.mlp_layer_fusion)

    def to_dict(self) -> dict:
        """Plain values (``weights_only`` loads them), saved in the adapter's ``schedulder.pt``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunSettings:
        return cls(AdamConfig(**d["adam"]), LRSchedulerConfig(**d["lr_scheduler"]),
                   Beta2SchedulerConfig(**d["beta2_scheduler"]), d["rampup"], int(d["zero1"]),
                   bool(d["mlp_layer_fusion"]))


# ---- pickling InternEvo's enum by name


class _Pickler(pickle._Pickler):
    """The pure-Python pickler (``torch.save`` accepts any ``pickle_module``), writing the stand-in
    ``ParallelMode`` class as InternEvo's global ``PARALLEL_MODE``: an instance then pickles exactly as the
    enum member does (``GLOBAL 'internlm.core.context.process_group_initializer ParallelMode'``, its value,
    ``REDUCE``), so InternEvo unpickles its own ``ParallelMode.ZERO1`` and the adapter's reader its stand-in.
    (The C pickler would look the name up and fail: InternEvo is not installed here.)"""

    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        if obj is not ParallelMode:
            return super().save_global(obj, name)
        module, qualname = PARALLEL_MODE.rsplit(".", 1)
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("utf-8"))
        self.memoize(obj)


_PICKLE_MODULE = types.ModuleType("internevo_pickle")  # torch.save reads its __name__ and its Pickler
_PICKLE_MODULE.Pickler = _Pickler
ZERO1 = ParallelMode("zero1")
"""``ParallelMode.ZERO1``: the ``optimizer_mode`` of both groups InternEvo makes (``train/utils.py``)."""


def save(obj: Any, path: Path) -> None:
    """``torch.save`` as InternEvo's synchronous saves do (protocol 2), with ``ParallelMode`` by name."""
    torch.save(obj, path, pickle_module=_PICKLE_MODULE)


# ---- the ZeRO partition


def zero_plan(params: list[Parameter], zero: int) -> list[list[tuple[str, Parameter]]]:
    """Per ZeRO rank, ``(plan id, parameter)`` of its parameters in flat order: ``HybridZeroOptimizer.
    _partition_param_list`` over one (tensor, pipeline) rank's ``default`` group (no ``overlap_sync_param``)."""
    ranks: list[list[tuple[str, Parameter]]] = [[] for _ in range(zero)]
    totals = [0] * zero
    for index, param in enumerate(by_size(params)):
        rank = totals.index(min(totals))
        ranks[rank].append(("_".join(map(str, (index, *param.shape))), param))
        totals[rank] += param.numel
    return ranks


# ---- the small files


def _param_groups(settings: RunSettings, step: int, dtype: torch.dtype, has_params: bool) -> list[dict]:
    """AdamW's param groups as InternEvo saved them at ``step`` updates (torch 2.13's AdamW keys, in the
    order InternEvo's groups get them): lr and beta2 are the values for the next update."""
    from adapter.train.schedules import beta2, learning_rate

    adam = settings.adam

    def optim() -> dict:  # each group its own values, as each got AdamW's defaults
        return {"lr": learning_rate(step, adam.lr, settings.lr_scheduler),
                "betas": (adam.beta1, beta2(step, adam.beta2, settings.beta2_scheduler)), "eps": adam.eps,
                "amsgrad": False, "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                "fused": True, "decoupled_weight_decay": True}

    default = {"name": "default", "weight_decay": adam.weight_decay, "optimizer_mode": ZERO1, **optim(),
               "dtype": dtype, "initial_lr": adam.lr, "params": [0] if has_params else []}
    fp32 = {"name": "fp32", "optimizer_mode": ZERO1, "weight_decay": adam.weight_decay, **optim(), "dtype": None,
            "initial_lr": adam.lr, "params": []}
    return [default, fp32]


def scheduler_state(settings: RunSettings, step: int, groups: int = 2) -> dict:
    """InternEvo's ``FineTuneCosineAnnealingWarmupLR.state_dict()`` after ``step`` updates (torch 2.13's
    private fields). The warm-up scheduler counts to the switch (``W = init + warmup`` steps) and then hands
    over to its ``CosineAnnealingLR``, which counts the rest; both hold the lr of the next update."""
    from adapter.train.schedules import learning_rate

    sched, base = settings.lr_scheduler, settings.adam.lr
    switch = sched.init_steps + sched.warmup_steps
    finished = step >= switch
    lr, base_lrs = [learning_rate(step, base, sched)] * groups, [base] * groups
    warm, after = min(step, switch), max(step - switch, 0)
    # at the switch the cosine takes over the warm-up's base_lrs list; its _last_lr is the warm-up's after it
    return {"_init_steps": sched.init_steps, "_warmup_steps": sched.warmup_steps, "warmup_epochs": switch,
            "finished": finished, "base_lrs": base_lrs, "last_epoch": warm, "_step_count": warm + 1,
            "_is_initial": False, "_get_lr_called_within_step": False, "_last_lr": lr,
            "after_scheduler_type": "CosineAnnealingLR",
            "after_scheduler_dict": {"T_max": sched.total_steps - switch, "eta_min": sched.eta_min,
                                     "base_lrs": base_lrs if finished else [base] * groups, "last_epoch": after,
                                     "_step_count": after + 1, "_is_initial": False,
                                     "_get_lr_called_within_step": False,
                                     "_last_lr": lr if finished else [base] * groups}}


#: what the writer reads of the adapter's sampler state (``data.sampler.BatchSampler.state_dict``: the epoch
#: named by the generator before its shuffle, as InternEvo's is; states holding the index array instead, as
#: earlier versions wrote them, cannot say that) and of its ``context.pt``
_SAMPLER_KEYS = ("batch_count", "consumed", "epoch", "seed", "data_world_size", "batch_size", "num_samples",
                 "epoch_size", "epoch_rng_state")
_CONTEXT_KEYS = ("batch_count", "num_consumed_tokens", "inf_nan_skip_batches", "grad_scaler")


def sampler_file(state: Mapping[str, Any], rampup: Optional[str]) -> dict:
    """InternEvo's ``StaticBatchSampler.state_dict()`` from the adapter's: the generator before the epoch's
    shuffle and that shuffle (``int64``, truncated to the epoch), which InternEvo rebuilds on load."""
    from adapter.data.sampler import rng_from_saved

    rng = rng_from_saved(state["epoch_rng_state"])
    generator = np.random.RandomState()
    generator.set_state(rng)
    indices = np.arange(int(state["num_samples"]), dtype=np.int64)
    generator.shuffle(indices)
    return {"batch_size": int(state["batch_size"]), "raw_rampup_batch_size": rampup,
            "rng_state": (str(rng[0]), rng[1], int(rng[2]), int(rng[3]), float(rng[4])),
            "epoch": int(state["epoch"]), "seed": int(state["seed"]), "data_world_size": int(state["data_world_size"]),
            "num_consumed_samples_in_epoch": int(state["consumed"]), "batch_count": int(state["batch_count"]),
            "indices": indices[:int(state["epoch_size"])]}


def regroup_sampler(state: Mapping[str, Any], dp: int, rampup: Optional[str]) -> dict:
    """The adapter's sampler state for ``dp`` data-parallel ranks instead of the saved run's, the global
    batch kept: InternEvo's rank ``r`` reads ``indices[r::dp]`` of each global batch (``INTERNEVO_FORMAT.md``
    §6.6), so the same global batch reads the same rows in the same steps at any size, and the epoch (whole
    global batches) is as long. Per rank: ``batch_size`` and the rows consumed scale by ``saved / dp``.
    With a ramp-up the batch grows per rank in whole micro-batches and would not regroup: refused."""
    saved, batch = int(state["data_world_size"]), int(state["batch_size"])
    rows = saved * batch
    if rampup:
        raise SizeError(f"data-parallel size {dp}: the run ramps its batch up (data.rampup_batch_size={rampup!r}), "
                        f"so InternEvo resumes its sampler only at the saved data-parallel size {saved}")
    if rows % dp:
        raise SizeError(f"data-parallel size {dp}: the run's global batch of {rows} rows ({batch} per rank × {saved} "
                        f"ranks) does not split over {dp} ranks (InternEvo's data.micro_num × data-parallel size "
                        "must stay the global batch for the run to read the same rows)")
    return {**state, "data_world_size": dp, "batch_size": rows // dp, "consumed": int(state["consumed"]) * saved // dp}


def context_file(context: Mapping[str, Any], sampler: Mapping[str, Any], step: int) -> dict:
    """InternEvo's ``TrainState.state_dict()``; its ``num_consumed_samples_in_epoch`` counts one rank's rows."""
    return {"batch_count": int(context["batch_count"]), "num_consumed_samples_in_epoch": int(sampler["consumed"]),
            "num_consumed_tokens": int(context["num_consumed_tokens"]),
            "inf_nan_skip_batches": int(context["inf_nan_skip_batches"]), "step_count": step,
            "tensorboard_folder": context.get("tensorboard_folder")}


# ---- the whole folder


def _read(path: Path, metadata: bool = True) -> Any:
    """A small file of the checkpoint: plain data through the metadata allow-list, or (``metadata=False``)
    tensors too with ``weights_only``."""
    from adapter.checkpoint.io.safe_load import load_metadata

    try:
        return load_metadata(path) if metadata else torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the training checkpoint") from None
    except Exception as exc:  # a damaged or foreign file: one line naming it
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


@dataclasses.dataclass
class HandBack:
    """An adapter training checkpoint read and checked, ready to be written as InternEvo's at ``layout``
    with ``zero`` ZeRO-1 ranks over ``dp`` data-parallel ranks (the sampler regrouped for them)."""

    src: Path
    layout: ParallelLayout
    zero: int
    dp: int
    step: int
    adam_step: int
    settings: RunSettings
    context: dict
    sampler: dict

    @classmethod
    def prepare(cls, src: Path, layout: ParallelLayout, zero1: Optional[int] = None,
                settings: Optional[RunSettings] = None, dp: Optional[int] = None) -> HandBack:
        """``zero1``: the InternEvo run's ZeRO-1 size (default: the run config's ``parallel.zero1``, the whole
        data-parallel group when that is ``<= 0``). ``settings``: from ``--config``, else the checkpoint's.
        ``dp``: the InternEvo run's data-parallel size (default: the saved run's; another one keeps the
        global batch, ``regroup_sampler``)."""
        from adapter.train.state_files import completed_step

        step = completed_step(src)
        if step is None:
            raise CheckpointError(f"{src}: not a complete training checkpoint (no <step>.step marker)")
        if settings is None:
            saved = _read(src / "schedulder.pt").get("internevo")
            if saved is None:
                raise CheckpointError(f"{src / 'schedulder.pt'}: does not record the run's optimizer settings "
                                      "(written before hand-back support); pass the run's config with --config")
            settings = RunSettings.from_dict(saved)
        steps = _read(src / FOLDER / STEPS_FILE)["steps"]
        if len(set(steps)) != 1:
            raise CheckpointError(f"{src / FOLDER / STEPS_FILE}: parameter groups at different Adam steps {steps}")
        sampler, context = _read(src / "sampler.pt", metadata=False), _read(src / "context.pt")
        for name, state, keys in (("sampler.pt", sampler, _SAMPLER_KEYS), ("context.pt", context, _CONTEXT_KEYS)):
            if missing := [k for k in keys if k not in state]:
                raise CheckpointError(f"{src / name}: no {missing[0]!r} (an earlier version's, or not the adapter's)")
        if dp is not None and dp != int(sampler["data_world_size"]):
            sampler = regroup_sampler(sampler, dp, settings.rampup)
        dp = int(sampler["data_world_size"])
        zero = zero1 if zero1 is not None else settings.zero1 if settings.zero1 > 0 else dp
        if zero < 1 or dp % zero:
            raise SizeError(f"ZeRO-1 size {zero} does not divide the run's data-parallel size {dp} (InternEvo "
                            "needs it to; its sampler state is for that data-parallel size)")
        return cls(src, layout, zero, dp, step, int(steps[0]), settings, context, sampler)

    def files(self) -> list[str]:
        lay, world = self.layout, self.layout.tp * self.layout.pp * self.dp
        ranks = [(t, p) for p in range(lay.pp) for t in range(lay.tp)]
        return ([f"model_tp{t}_pp{p}.pt" for t, p in ranks] + [f"topo_tp{t}_pp{p}.json" for t, p in ranks]
                + [f"optimizer_tp{t}_pp{p}_zo{z}.pt" for t, p in ranks for z in range(self.zero)]
                + [f"gpus-{world}_wp-0_tp-{t}_dp-{d}_pp-{p}_zo-{d % self.zero}.pt" for t, p in ranks
                   for d in range(self.dp)]
                + ["sampler.pt", "schedulder.pt", "context.pt", "model_config.pt", f"{self.step}.step"])

    def write(self, dst: Path, overwrite: bool = False) -> Path:
        """Write the whole folder atomically (it appears complete or not at all)."""
        from adapter.atomic import atomic_directory, require_space
        from adapter.checkpoint.convert import disk_errors, open_checkpoint
        from adapter.checkpoint.stream_convert import meta_tensors

        source = open_checkpoint(self.src)
        meta = meta_tensors(source.tensors, source.model, None)
        weights = sum(t.numel() * t.element_size() for t in meta.values())
        states = 3 * 4 * sum(t.numel() for t in meta.values())
        with atomic_directory(dst, overwrite=overwrite, inputs=[self.src]) as tmp:
            require_space(dst, weights + states)
            with disk_errors(tmp, dst):
                self.write_into(tmp, source)
        return dst

    def write_into(self, folder: Path, source: Any) -> None:
        """The files of ``files()`` into the empty ``folder``, the step marker last."""
        from adapter.checkpoint.convert import open_checkpoint, write_streaming
        from adapter.checkpoint.formats.internevo import shard_state_dict

        # model_config.pt says what the optimizer files hold (the run's settings decide the fused MLP)
        model, lay = dataclasses.replace(source.model, mlp_layer_fusion=self.settings.mlp_layer_fusion), self.layout
        write_streaming(source.tensors, model, "internevo", lay, folder, where=str(self.src))
        optimizer = {kind: open_checkpoint(self.src / FOLDER / kind, model).tensors for kind in STATES}
        for p in range(lay.pp):
            for t in range(lay.tp):
                save({}, folder / f"topo_tp{t}_pp{p}.json")
                tensors = {kind: shard_state_dict(optimizer[kind], model, lay, t, p) for kind in STATES}
                self._write_rank(folder, t, p, tensors, model)
        save(sampler_file(self.sampler, self.settings.rampup), folder / "sampler.pt")
        save(scheduler_state(self.settings, self.step), folder / "schedulder.pt")
        save(context_file(self.context, self.sampler, self.step), folder / "context.pt")
        save({"step": self.step}, folder / f"{self.step}.step")

    def _write_rank(self, folder: Path, t: int, p: int, tensors: dict[str, dict[str, torch.Tensor]],
                    model: ModelConfig) -> None:
        """``optimizer_tp{t}_pp{p}_zo{z}.pt`` for every ZeRO rank and the plan file of every data-parallel rank."""
        shapes = {k: tuple(v.shape) for k, v in tensors["fp32"].items()}
        ranks = zero_plan(parameters(shapes, model.family, self.settings.mlp_layer_fusion), self.zero)
        plan = [[[name for name, _ in entries] for entries in ranks], [[] for _ in ranks]]
        scaler = self.context["grad_scaler"]
        scaler = {"_scale": float(scaler["_scale"]), "_growth_step": int(scaler["_growth_step"]),
                  "_hysteresis_step": int(scaler["_hysteresis_step"])}
        for z, entries in enumerate(ranks):
            flat = {kind: torch.cat([tensors[kind][key].reshape(-1).float() for _, param in entries
                                     for key in param.keys])  # a fused [w1; w3] flattens as w1's then w3's
                    for kind in STATES} if entries else {}
            state = {0: {"step": torch.tensor(float(self.adam_step)), "exp_avg": flat["exp_avg"],
                         "exp_avg_sq": flat["exp_avg_sq"]}} if entries else {}
            groups = _param_groups(self.settings, self.step, _TORCH_DTYPES[model.dtype], bool(entries))
            save({"grad_scaler": scaler, "base_optim_states": {"state": state, "param_groups": groups},
                  "flat_fp32_weights": {0: flat["fp32"].requires_grad_()} if entries else {},
                  "zero_devide_optim_plan": plan}, folder / f"optimizer_tp{t}_pp{p}_zo{z}.pt")
        world = self.layout.tp * self.layout.pp * self.dp
        for d in range(self.dp):
            save(plan, folder / f"gpus-{world}_wp-0_tp-{t}_dp-{d}_pp-{p}_zo-{d % self.zero}.pt")
