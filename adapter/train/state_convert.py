"""Reshard a whole training checkpoint into the adapter's form at any layout (``internlm-ckpt convert
<training checkpoint> <dst> --to internevo --tp T --pp P --vpp V``).

What the target holds, whatever the source (``train.state_files`` describes the form):

* the weights as InternEvo model files cut for the target layout (``model_tp{t}_pp{p}.pt``, ``model_config.pt``);
* ``optimizer/{fp32,exp_avg,exp_avg_sq}/``: each state is a model folder, cut by the same tensor table as the
  weights, so it is resharded exactly like them; ``optimizer/state.pt``, Adam's step;
* ``context.pt`` (counters and the grad scaler), ``sampler.pt``, ``schedulder.pt``, and the ``{step}.step``
  marker, written last.

From the adapter's own checkpoints the small files are carried over byte for byte and the four model folders
streamed one model unit at a time (``checkpoint.stream_convert``), as weight conversions are. From a training
checkpoint InternEvo wrote, its ZeRO partitions are first cut back into per-parameter states, one (tensor,
pipeline) rank at a time (``train.internevo_state.import_optimizer``), into a staging folder inside the
output, then streamed from there; the grad scaler its optimizer files hold goes into ``context.pt``, its
sampler state becomes the adapter's, its scheduler file the adapter's ``{"step_count", "base_lr"}`` (with
the run's optimizer settings when a config is given, so that the result can be handed back to InternEvo). The
trainer resumes the result at any layout; InternEvo reads its model files, not its optimizer state.

The output appears whole or not at all (``atomic.atomic_directory``). A source whose save did not finish (no
marker), whose state files cannot be read, or whose optimizer files are DeepSpeed's own (``deepspeed/``, cut
for one layout) is refused with one line naming the file, before anything is written.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter.atomic import atomic_directory, require_space
from adapter.checkpoint import formats
from adapter.checkpoint.convert import Checkpoint, disk_errors, open_checkpoint, write_streaming
from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.safe_load import load_metadata
from adapter.config.schema import ModelConfig
from adapter.runtime.layout import ParallelLayout
from adapter.train.optimizer_state import FOLDER, STATES, STEPS_FILE
from adapter.train.state_inspect import CONTEXT, SAMPLER, SCHEDULES, TrainingState, read_state

_STAGING = ".internevo-import"
"""Inside the output's temporary folder: InternEvo's optimizer state, cut into parameters at its own layout."""


@dataclass
class TrainingSource:
    """A training checkpoint opened for conversion: its weights, state, and (adapter form) optimizer folders."""

    weights: Checkpoint
    state: TrainingState
    optimizer: dict[str, Checkpoint] = field(default_factory=dict)
    """``{"fp32"|"exp_avg"|"exp_avg_sq": the folder opened}``; empty for InternEvo's or a pre-Adam save."""

    @property
    def has_optimizer(self) -> bool:
        return bool(self.optimizer) or self.state.kind == "internevo"


def check_resumable_layout(model: ModelConfig, layout: ParallelLayout) -> None:
    """Refuse a target layout the trainer could not resume at (``checkpoint.convert.target_layout`` has refused
    those the files cannot be cut into): megatron-core's vocab-parallel embedding and head need equal shards."""
    if model.vocab_size % layout.tp:
        raise CheckpointError(f"--tp {layout.tp} does not divide the vocabulary ({model.vocab_size}): the trainer's "
                              f"vocab-parallel embedding and head need equal shards, so a training checkpoint "
                              f"at tp {layout.tp} could not resume")


def open_training(weights: Checkpoint) -> TrainingSource:
    """Check that ``weights.path`` is a complete training checkpoint that can be converted, reading headers and
    small files only; the first problem is raised as one line naming the file."""
    folder, model = weights.path, weights.model
    state = read_state(folder)
    if state.kind == "deepspeed":
        raise CheckpointError(f"{folder / 'deepspeed'}: DeepSpeed's own optimizer files (written by an earlier "
                              "version) are cut for the layout that saved them and cannot be resharded; resume the "
                              "checkpoint at that layout (its next save is layout-free), or pass --weights-only")
    if state.problems:
        more = f" (and {len(state.problems) - 1} more problems)" if len(state.problems) > 1 else ""
        raise CheckpointError(f"{state.problems[0]}{more}")
    source = TrainingSource(weights, state)
    if state.kind == "adapter" and (folder / FOLDER).is_dir():
        for kind in STATES:
            opened = open_checkpoint(folder / FOLDER / kind, model)
            for key in weights.tensors:
                ours, theirs = opened.tensors.meta(key), weights.tensors.meta(key)
                if ours.shape != theirs.shape:
                    raise CheckpointError(f"{opened.path}: {key} is {tuple(ours.shape)}, the weight "
                                          f"{tuple(theirs.shape)}")
            source.optimizer[kind] = opened
    return source


def planned_training_files(source: TrainingSource, layout: ParallelLayout) -> list[str]:
    """The files the conversion writes, relative to the target, the marker last (``--dry-run``)."""
    weights = formats.get("internevo").planned_files(layout)
    out = list(weights)
    if source.has_optimizer:
        out += [f"{FOLDER}/{kind}/{name}" for kind in STATES for name in weights] + [f"{FOLDER}/{STEPS_FILE}"]
    return out + [CONTEXT, SAMPLER, SCHEDULES, f"{source.state.step}.step"]


def skipped_files(source: TrainingSource) -> list[str]:
    """Source files the conversion does not carry (InternEvo's ZeRO plans and topology files, stray files; not
    the output marker of an earlier conversion, which the new output gets its own of)."""
    from adapter.atomic import MARKER as OUTPUT_MARKER
    from adapter.checkpoint.formats.internevo import MODEL_FILE
    from adapter.train.internevo_state import OPTIMIZER_FILE
    from adapter.train.state_files import MARKER

    used = {CONTEXT, SAMPLER, SCHEDULES, FOLDER, "model_config.pt", OUTPUT_MARKER}
    return sorted(p.name for p in source.weights.path.iterdir()
                  if p.name not in used and not (MODEL_FILE.match(p.name) or OPTIMIZER_FILE.match(p.name)
                                                 or MARKER.match(p.name)))


def write_training(source: TrainingSource, layout: ParallelLayout, dst: str | Path, *,
                   overwrite: bool = False, settings: dict | None = None) -> Path:
    """Write ``source`` at ``layout`` into ``dst`` in the adapter's form (module docstring), atomically;
    ``settings``: the run's optimizer settings (``RunSettings.to_dict``) to record for an InternEvo source."""
    from adapter.checkpoint.stream_convert import meta_tensors

    weights, model = source.weights, source.weights.model
    meta = meta_tensors(weights.tensors, model, None)
    planned = sum(t.numel() * t.element_size() for t in meta.values())
    if source.has_optimizer:  # three fp32 states, staged once more when InternEvo's are cut into parameters
        planned += 3 * 4 * sum(t.numel() for t in meta.values()) * (2 if source.state.kind == "internevo" else 1)
    with atomic_directory(dst, overwrite=overwrite, inputs=[weights.path]) as tmp:
        require_space(dst, planned)
        with disk_errors(tmp, dst):
            write_streaming(weights.tensors, model, "internevo", layout, tmp, where=str(weights.path))
            if source.state.kind == "internevo":
                _import_internevo(source, layout, tmp, settings)
            else:
                _carry_adapter(source, layout, tmp)
            torch.save({"step": source.state.step}, tmp / f"{source.state.step}.step")  # last, as the trainer does
    return Path(dst)


def _stream_states(states: dict[str, Checkpoint], model: ModelConfig, layout: ParallelLayout, tmp: Path) -> None:
    """Each optimizer state, a model folder, cut for ``layout`` one model unit at a time."""
    for kind, opened in states.items():
        target = tmp / FOLDER / kind
        target.mkdir(parents=True)
        write_streaming(opened.tensors, model, "internevo", layout, target, where=str(opened.path))


def _carry_adapter(source: TrainingSource, layout: ParallelLayout, tmp: Path) -> None:
    folder = source.weights.path
    _stream_states(source.optimizer, source.weights.model, layout, tmp)
    if source.optimizer:
        shutil.copyfile(folder / FOLDER / STEPS_FILE, tmp / FOLDER / STEPS_FILE)
    for name in (CONTEXT, SAMPLER, SCHEDULES):
        shutil.copyfile(folder / name, tmp / name)


def _import_internevo(source: TrainingSource, layout: ParallelLayout, tmp: Path, settings: dict | None) -> None:
    """InternEvo's partitions → per-parameter states (staged at its layout) → the target layout; its sampler,
    counters and scheduler as the adapter keeps them, with the run's optimizer ``settings`` when known (a
    config was given), so that the result can be handed back."""
    from adapter.train.internevo_state import import_optimizer, imported_sampler

    folder, model, step = source.weights.path, source.weights.model, source.state.step
    staging = tmp / _STAGING
    scaler = import_optimizer(folder, model, staging)
    _stream_states({kind: open_checkpoint(staging / FOLDER / kind, model) for kind in STATES}, model, layout, tmp)
    shutil.copyfile(staging / FOLDER / STEPS_FILE, tmp / FOLDER / STEPS_FILE)
    shutil.rmtree(staging)
    torch.save({**load_metadata(folder / CONTEXT), "grad_scaler": scaler}, tmp / CONTEXT)
    torch.save(imported_sampler(folder / SAMPLER), tmp / SAMPLER)
    base_lrs = load_metadata(folder / SCHEDULES).get("base_lrs") or [None]
    schedules = {"step_count": step, "base_lr": base_lrs[0]}
    if settings is not None:  # what handing the run back to InternEvo needs (``train.internevo_export``)
        schedules["internevo"] = settings
    torch.save(schedules, tmp / SCHEDULES)
