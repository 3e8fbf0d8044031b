"""Training checkpoints: save the whole training state, find the newest complete one, and resume from it.

A checkpoint folder (``<save_ckpt_folder>/<step>/`` or a snapshot slot ``<snapshot>/{0,1}/``) holds:

* ``model_tp{t}_pp{p}.pt``: the model in InternEvo's layout (``checkpoint.formats.internevo``), written by the
  data-parallel ranks of each (tensor, pipeline) rank together (``train.shared_files``), so InternEvo and
  ``internlm-ckpt`` read it;
* ``optimizer/``: ZeRO-1's fp32 master weights and Adam's moments per logical tensor, in the same layout
  (``train.optimizer_state``), so a run resumes at any tensor/pipeline/virtual/data-parallel layout;
* ``context.pt`` (InternEvo's ``TrainState`` keys, plus the loss-scaler state), ``sampler.pt`` (the batch
  sampler), ``schedulder.pt`` (InternEvo's spelling; the step the lr/beta2 schedules are at, and the run's
  optimizer settings InternEvo's own files need when the run is handed back: ``train.internevo_export``) and
  ``model_config.pt`` (a plain dict);
* ``{step}.step``, InternEvo's completion marker, written last after a barrier. A folder without a marker is
  never loaded; before a snapshot slot is reused its markers are deleted first, so an interrupted overwrite
  cannot pass for complete.

Every file is written under a temporary name and renamed. Object storage goes through a local staging
folder (``train.checkpointing``). Checkpoints of earlier versions hold DeepSpeed's own engine checkpoint
under ``deepspeed/`` instead of ``optimizer/``; they resume at the layout that wrote them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from adapter.checkpoint.formats.internevo import model_config_dict
from adapter.checkpoint.io.safe_load import load_metadata
from adapter.checkpoint.io.stream_write import save_tensors
from adapter.config.errors import ConfigError
from adapter.config.schema import InternLMConfig
from adapter.runtime import cpu
from adapter.runtime.layout import ParallelLayout
from adapter.train.optimizer_state import FOLDER, STATES, STEPS_FILE, StateSave, has_state

MARKER = re.compile(r"^(\d+)\.step$")
DEEPSPEED_TAG = "deepspeed"


def atomic_save(obj: object, path: Path, write: Callable[[object, Path], None] = torch.save) -> None:
    """``write(obj, path)`` where the shared files are written until complete (``shared_files.unfinished``),
    then renamed: a reader never sees half a file."""
    from adapter.train.shared_files import drop_unfinished, unfinished

    tmp = unfinished(path)
    tmp.parent.mkdir(exist_ok=True)
    write(obj, tmp)
    os.replace(tmp, path)
    drop_unfinished(tmp.parent)


def save_checkpoint(folder: Path, cfg: InternLMConfig, layout: ParallelLayout, trainer, sampler, context: dict,
                    step: int, marker: bool = True, shared: bool = True) -> Path:
    """Write the training state into ``folder``; collective over all ranks. ``marker=False`` leaves the
    completion marker to the caller (object storage uploads it once every file is up). ``shared`` says that
    every rank writes into the same ``folder`` (one file system), so that a file's data-parallel ranks write
    it together (``train.shared_files``); otherwise each file is written by one of them."""
    from adapter.train.internevo_export import RunSettings

    # the folder is made by one rank, or where it is each node's own, by one rank on each node
    makes_folder = dist.get_rank() == 0 if shared else int(os.environ.get("LOCAL_RANK", "0")) == 0
    if makes_folder:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():  # a reused snapshot slot stops being "complete" before it is rewritten
            if MARKER.match(old.name):
                old.unlink()
        if has_state(trainer):
            for key in STATES:
                (folder / FOLDER / key).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    # The first state's ZeRO parts start moving to the ranks that write them before the weights are cut, and
    # travel meanwhile. The tensors are views of the parameters and of ZeRO's buffers: written as they are.
    with cpu.paused():  # tensors keep their devices: no CUDA names to rewrite on the CPU
        StateSave(trainer, cfg, layout, shared).write(folder, lambda obj, path: atomic_save(obj, path, save_tensors))
    if dist.get_rank() == 0:
        atomic_save(model_config_dict(cfg.model), folder / "model_config.pt")
        atomic_save({**context, "step_count": step, "grad_scaler": trainer.scaler.state_dict()},
                    folder / "context.pt")
        atomic_save(sampler.state_dict(), folder / "sampler.pt")
        atomic_save({"step_count": step, "base_lr": cfg.adam.lr, "internevo": RunSettings.from_config(cfg).to_dict()},
                    folder / "schedulder.pt")
    dist.barrier()
    if marker and dist.get_rank() == 0:
        atomic_save({"step": step}, folder / f"{step}.step")
    dist.barrier()
    return folder


def completed_step(folder: Path) -> Optional[int]:
    """The step of a complete checkpoint folder (its highest ``N.step`` marker), or None."""
    if not folder.is_dir():
        return None
    steps = [int(m[1]) for p in folder.iterdir() if (m := MARKER.match(p.name))]
    return max(steps) if steps else None


def latest_checkpoint(save_folder: Path, snapshot_folder: Optional[Path]) -> Optional[Path]:
    """The newest complete checkpoint under ``save_folder`` (numbered folders) and the two snapshot slots."""
    candidates = []
    if save_folder.is_dir():
        candidates += [p for p in save_folder.iterdir() if p.name.isdigit()]
    if snapshot_folder is not None:
        candidates += [snapshot_folder / "0", snapshot_folder / "1"]
    best = None
    for folder in candidates:
        step = completed_step(folder)
        if step is not None and (best is None or step > best[0]):
            best = (step, folder)
    return best[1] if best else None


def weights_from_optimizer(folder: Path, load_optimizer: bool) -> bool:
    """Whether resuming from ``folder`` restores an optimizer whose fp32 master weights then give the
    model's weights (``optimizer_state.load_optimizer_state``), so that its model files need not be read.

    They are the same numbers: after every step ZeRO (and InternEvo's optimizer) copies each master weight
    into its model weight, in the model's dtype, and a checkpoint saves both after a step. DeepSpeed's own
    ZeRO load and universal checkpoints do the same (``load_from_fp32_weights``)."""
    from adapter.train.internevo_state import holds_optimizer

    return load_optimizer and ((folder / FOLDER / STEPS_FILE).exists() or holds_optimizer(folder))


def load_model_weights(folder: Path, cfg: InternLMConfig, layout: ParallelLayout, chunks: list, field: str) -> None:
    """Initialise the chunks from a model checkpoint in any format ``internlm-ckpt`` reads (InternEvo at any
    layout, Hugging Face, megatron-core ``torch_dist`` or legacy), resharded to this rank on the fly.

    Call it before the DeepSpeed engine exists: ZeRO copies its fp32 master weights from the module at
    ``deepspeed.initialize``, and weights loaded afterwards would be overwritten by the first update.
    ``field`` names the config key that pointed here, for errors.
    """
    from megatron.core import parallel_state as ps

    from adapter.checkpoint.convert import detect_format, open_checkpoint
    from adapter.checkpoint.errors import CheckpointError
    from adapter.checkpoint.io import mapped
    from adapter.model.mapping import chunk_pieces, model_state
    from adapter.train.open_shared import open_folders

    # each tensor goes straight from the files into the module's memory (joined pieces too), the reads queued
    # while the next ones are cut (``mapped.Reads``), and torch's calls skip the CPU path's mode (no device is
    # named here): ``load_state_dict`` of the cut views, which copied them out of the mapping a page fault at a
    # time, took 2.6× as long as reading the files once (BENCHMARKS.md)
    targets = [model_state(chunk) for chunk in chunks]
    try:
        with cpu.paused(), torch.no_grad(), mapped.Reads([t for state in targets for t in state.values()]):
            if detect_format(folder) == "internevo":  # checked by the last rank (the optimizer's by the first ones)
                tensors = open_folders([folder], cfg.model, one_writer=False, first=dist.get_world_size() - 1)[0]
            else:
                tensors = open_checkpoint(folder, cfg.model).tensors
            pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
            for vp, state in enumerate(targets):
                left = set(state)
                # only this chunk's tensors are read: the source is lazy
                for key, value in chunk_pieces(tensors, cfg.model, layout, pp_rank, vp, tp_rank, into=state.get):
                    if key not in left:
                        raise CheckpointError(f"{folder}: weights do not fit the model (unexpected {key})")
                    left.remove(key)
                    if value.shape != state[key].shape:
                        raise CheckpointError(f"{folder}: {key} is {tuple(value.shape)} here, the model's "
                                              f"{tuple(state[key].shape)}")
                    if value.data_ptr() != state[key].data_ptr():  # else joined in place
                        mapped.copy(state[key], value)
                if left:
                    raise CheckpointError(f"{folder}: weights do not fit the model (missing {sorted(left)[:3]})")
    except (CheckpointError, KeyError, RuntimeError, ValueError) as exc:  # wrong sizes or names: which file, key
        raise ConfigError(field, f"cannot initialise the model from {folder}: {exc}") from None


def load_training_state(folder: Path, cfg: InternLMConfig, layout: ParallelLayout, trainer,
                        load_optimizer: bool, field: str) -> dict:
    """Restore the optimizer (unless ``load_optimizer`` is False) and the counters from ``folder``; returns
    ``context.pt`` (with ``sampler`` holding the sampler state). The weights come with the optimizer's fp32
    master weights, or, where no optimizer state is restored, are already in the model
    (``load_model_weights``, before the engine was built; ``weights_from_optimizer`` decides). ``folder`` is
    this adapter's checkpoint, at any layout, or one InternEvo wrote (``train.internevo_state``)."""
    from adapter.checkpoint.errors import CheckpointError
    from adapter.train.internevo_state import holds_optimizer, sampler_state, unread_optimizer
    from adapter.train.optimizer_state import load_optimizer_state

    internevo = holds_optimizer(folder)
    context = load_metadata(folder / "context.pt")
    try:
        if internevo or unread_optimizer(folder) is not None:  # InternEvo's sampler, its optimizer read or not
            context["sampler"] = sampler_state(folder / "sampler.pt")
        else:
            context["sampler"] = torch.load(folder / "sampler.pt", weights_only=True)
        if not load_optimizer:
            pass  # the weights are loaded; ZeRO took its fp32 masters from them, Adam starts fresh
        elif internevo:
            with _node_shared_folder() as (converted, converts):
                context["grad_scaler"] = _once_per_node(
                    converts, lambda: _import_internevo(folder, cfg.model, converted))
                with cpu.paused():
                    load_optimizer_state(converted, cfg, layout, trainer)
        elif (folder / FOLDER / STEPS_FILE).exists():
            with cpu.paused():  # tensors keep their devices: no CUDA names to rewrite on the CPU
                load_optimizer_state(folder, cfg, layout, trainer)
        elif (folder / DEEPSPEED_TAG).is_dir():  # written by an earlier version: DeepSpeed's own, same layout only
            trainer.deepspeed.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=False)
            # DeepSpeed restores the saving run's clipping threshold with the optimizer state; this config decides
            trainer.optimizer.clip_grad = cfg.applied_clip_grad_norm
    except CheckpointError as exc:
        raise ConfigError(field, f"cannot resume from {folder}: {exc}") from None
    trainer.step_count = int(context["step_count"])
    if load_optimizer and "grad_scaler" in context:
        trainer.scaler.load_state_dict(context["grad_scaler"])
        if trainer.scaler.enabled:
            trainer.optimizer.loss_scaler.cur_scale = trainer.scaler.scale
    return context


def _import_internevo(folder: Path, model, target: Path) -> dict:
    """``internevo_state.import_optimizer`` into the node's temporary folder, once its disk is known to have
    room: the converted states are the same fp32 elements as InternEvo's optimizer files, so about their size
    (12 bytes per parameter: 84 GB for a 7B model)."""
    from adapter.atomic import NoSpaceError, require_space
    from adapter.checkpoint.errors import CheckpointError
    from adapter.train.internevo_state import OPTIMIZER_FILE, import_optimizer

    planned = sum(p.stat().st_size for p in folder.iterdir() if OPTIMIZER_FILE.match(p.name))
    try:
        require_space(target, planned)
    except NoSpaceError as exc:
        raise CheckpointError(f"{exc}: InternEvo's optimizer state is converted there once per node before the "
                              "run starts; set TMPDIR to a folder on a larger disk") from None
    return import_optimizer(folder, model, target)


@contextlib.contextmanager
def _node_shared_folder() -> Iterator[tuple[Path, bool]]:
    """A temporary folder every rank of a node sees, and whether this rank fills it: converting InternEvo's
    optimizer files once per node (local rank 0), not once per rank, keeps a 7B import from writing the
    state eight times over. Its name comes from rank 0, so that concurrent jobs on a node never share one;
    it is removed once every rank has read it."""
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    folder = Path(tempfile.gettempdir()) / f"internlm-adapter-import-{token[0]}"
    converts = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if converts:
        folder.mkdir(parents=True)
    try:
        yield folder, converts
    finally:
        dist.barrier()  # every rank of the node has read it
        if converts:
            shutil.rmtree(folder, ignore_errors=True)


def _once_per_node(converts: bool, work: Callable[[], Any]) -> Any:
    """``work()`` on the ranks that ``converts``, its result on every rank (collective: no rank reads the
    node's folder before it is complete). A failure stops every rank: the failing rank raises its own
    error, the others a CheckpointError that quotes it, so that none waits forever."""
    from adapter.checkpoint.errors import CheckpointError

    outcome: tuple = (False, None, None)  # (ran, result, error)
    if converts:
        try:
            outcome = (True, work(), None)
        except Exception as exc:
            outcome = (True, None, f"{type(exc).__name__}: {exc}")
            failure = exc
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    errors = [(rank, error) for rank, (_, _, error) in enumerate(outcomes) if error]
    if errors:
        if outcome[2]:
            raise failure
        rank, error = errors[0]
        raise CheckpointError(f"rank {rank} could not convert it: {error}")
    return next(result for ran, result, _ in outcomes if ran)
