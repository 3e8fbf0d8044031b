"""``internlm-ckpt``: inspect, convert and compare InternLM checkpoints across InternEvo, Megatron and HF."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from adapter.checkpoint.formats import REGISTRY
from adapter.cli.common import closed_pipe, positive_int, tolerance

if TYPE_CHECKING:  # importing them imports torch, which the argument parser does not need
    from adapter.checkpoint.convert import Checkpoint
    from adapter.runtime.layout import ParallelLayout

DESCRIPTION = """\
Move InternLM weights between InternEvo's sharded checkpoints (model_tp{t}_pp{p}.pt, any TP/PP and virtual
chunks), megatron-core's distributed checkpoint (torch_dist, loadable at any layout) and Megatron-LM's
per-rank layout of the adapter's megatron-core model, and Hugging Face safetensors
that transformers' LlamaForCausalLM loads without remote code. The source format, family and layout are
detected from the files; every conversion goes through InternEvo's logical (tp=1) tensors and is bit-exact.
Model files are loaded with weights_only=True; InternEvo's model_config.pt through an allow-list.
"""

EPILOG = """\
examples:
  internlm-ckpt inspect llm_ckpts/5000
  internlm-ckpt inspect llm_ckpts/5000 --tensors
  internlm-ckpt convert llm_ckpts/5000 hf/internlm-7b --to hf --dtype bf16 --tokenizer internlm/internlm-7b
  internlm-ckpt convert llm_ckpts/5000 resharded --to internevo --tp 2 --pp 4 --vpp 2
  internlm-ckpt convert runs/7b/ckpt/5000 back --to internevo --tp 2 --zero1 4   # hand a run back to InternEvo
  internlm-ckpt convert runs/7b/ckpt/5000 back16 --to internevo --tp 2 --dp 16   # ... for 16 data-parallel ranks
  internlm-ckpt convert runs/7b/ckpt/5000 pp1 --to internevo --pp 1 --state adapter   # reshard for this trainer
  internlm-ckpt convert llm_ckpts/5000 weights --to internevo --weights-only
  internlm-ckpt convert hf/internlm2-7b mcore/ --to mcore
  internlm-ckpt convert hf/internlm2-7b megatron/ --to mcore-legacy --tp 4 --pp 2
  internlm-ckpt convert llm_ckpts/5000 out --to hf --dry-run
  internlm-ckpt verify llm_ckpts/5000 hf/internlm-7b

--config CONFIG supplies model sizes a folder cannot tell (head counts for Megatron folders, or an
InternEvo folder without model_config.pt); --tp/--pp/--vpp default to the config's layout, else 1 (with an
explicit --pp, --vpp defaults to 1, not to the config's model.num_chunks).
A training checkpoint of this adapter (one with optimizer/) converted --to internevo (--state internevo, the
default) becomes InternEvo's whole training state at that layout: model files, HybridZeroOptimizer partitions
for --zero1 ranks (default: the run's parallel.zero1, or its data-parallel size), zero plans, sampler
(for --dp data-parallel ranks, default the saved run's: another size keeps the global batch),
scheduler, context and step marker, which InternEvo 0.5.2 resumes with load_ckpt_info content=("all",); its
optimizer settings come from the checkpoint, or from --config for checkpoints written before this.
A torch_dist (--to mcore) folder has no layout: megatron-core loads it at any TP/PP/VPP; --tp/--pp/--vpp,
when given, are only checked against the model (megatron could not load it at a size that does not fit).

With --state adapter, a training checkpoint (one the adapter's trainer saved, with optimizer/, or one
InternEvo saved, with optimizer_tp*_pp*_zo*.pt) converted --to internevo keeps its whole training state, in
the adapter's form: the model files and optimizer/{fp32,exp_avg,exp_avg_sq}/ cut for the target layout (the
optimizer states are resharded exactly like the weights), optimizer/state.pt (Adam's step), context.pt
(counters, grad scaler), sampler.pt, schedulder.pt and the step marker, written last. Training resumes it at
any layout; InternEvo reads its model files, not its optimizer state (InternEvo's ZeRO files, gpus-*.pt plans
and topology files are not carried). --weights-only writes the model files alone; --to hf, mcore and
mcore-legacy always do. A checkpoint whose save did not finish (no N.step marker), with a state file that
cannot be read, or with DeepSpeed's own optimizer files (deepspeed/, written by earlier versions, cut for one
layout) is refused with the file and the reason; so is a --tp that does not divide the vocabulary (the trainer
could not resume it).

The output never overlaps an input (same folder, or one inside the other, after resolving symlinks and
..), and --overwrite replaces only a folder this tool wrote (it leaves a .internlm-adapter.json listing its
files); anything else is refused. Free space is checked before writing.

exit status: 0 ok (verify: the checkpoints match), 1 mismatch, bad checkpoint or unwritable target
(exists, no space), 2 bad arguments (including a target that overlaps an input or a layout the model
cannot be split into).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internlm-ckpt", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{inspect,convert,verify}")
    inspect = sub.add_parser("inspect", help="format, family, layout, dtype and size of a checkpoint, and its "
                                             "training state (optimizer, sampler, counters; headers only)")
    inspect.add_argument("path")
    inspect.add_argument("--tensors", action="store_true", help="also list every logical tensor")
    inspect.add_argument("--config", help="InternEvo config with the model sizes")
    convert = sub.add_parser("convert", help="write a checkpoint in another format or layout",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", required=True, choices=list(REGISTRY),
                         help="internevo: model_tp*_pp*.pt (of a training checkpoint: its whole training state, "
                              "see --state and below); mcore: megatron-core torch_dist (loads at any layout); "
                              "mcore-legacy: Megatron-LM iter_*/mp_rank_*; hf: transformers LlamaForCausalLM")
    convert.add_argument("--tp", type=positive_int, help="target tensor-parallel size")
    convert.add_argument("--pp", type=positive_int, help="target pipeline-parallel size")
    convert.add_argument("--vpp", type=positive_int, help="target virtual stages (chunks) per pipeline rank")
    convert.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast the weights")
    convert.add_argument("--zero1", type=positive_int,
                         help="with --to internevo from a training checkpoint: the InternEvo run's ZeRO-1 size")
    convert.add_argument("--dp", type=positive_int,
                         help="with --to internevo from a training checkpoint: the InternEvo run's data-parallel "
                              "size (default: the saved run's; another one keeps the global batch, so set "
                              "data.micro_num to global batch / dp there)")
    convert.add_argument("--config", help="InternEvo config: model sizes, and the default target layout")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace a target folder this tool wrote (never one it did not write)")
    convert.add_argument("--tokenizer", metavar="DIR",
                         help="with --to hf: copy the tokenizer files saved in DIR (tokenizer.json, tokenizer.model, "
                              "tokenizer_config.json, special_tokens_map.json, ...) into the export")
    convert.add_argument("--dry-run", action="store_true", help="print the plan (files to read and write) only")
    convert.add_argument("--state", choices=("internevo", "adapter"), default="internevo",
                         help="with --to internevo from a training checkpoint: internevo (default) writes "
                              "InternEvo's own training state, which InternEvo 0.5.2 resumes; adapter writes the "
                              "adapter's layout-free form, which this trainer resumes at any layout")
    convert.add_argument("--weights-only", action="store_true",
                         help="with --to internevo: write the model files only, not a training checkpoint's "
                              "optimizer, sampler and counters")
    verify = sub.add_parser("verify", help="compare two checkpoints tensor by tensor (exit 0 when they match)")
    verify.add_argument("a")
    verify.add_argument("b")
    verify.add_argument("--atol", type=tolerance, default=0.0, help="allowed absolute difference (default: exact)")
    verify.add_argument("--config", help="InternEvo config with the model sizes")
    return parser


class _BadArguments(ValueError):
    """The target layout asked for does not fit the model (exit 2, like any bad argument)."""


def _layout(args: argparse.Namespace, model, layout_cfg):
    """The layout to write (None for formats without one: hf, mcore); sizes the model cannot be split into
    are bad arguments."""
    from adapter.checkpoint import formats
    from adapter.checkpoint.convert import target_layout
    from adapter.checkpoint.errors import CheckpointError

    try:
        needs_layout = formats.get(args.to).NEEDS_LAYOUT
        if not needs_layout and (args.tp or args.pp or args.vpp):
            target_layout(model, args.tp or 1, args.pp or 1, args.vpp or 1)  # refuses sizes that do not fit
        if needs_layout:
            tp = args.tp or (layout_cfg.tp if layout_cfg else 1)
            pp = args.pp or (layout_cfg.pp if layout_cfg else 1)
            # the config's chunks belong to the config's pipeline: an explicit --pp starts from 1 chunk
            vpp = args.vpp or (layout_cfg.vpp if layout_cfg and not args.pp else 1)
            return target_layout(model, tp, pp, vpp)
    except CheckpointError as exc:
        raise _BadArguments(str(exc)) from None
    return None


def _tokenizer(args: argparse.Namespace) -> list[Path]:
    """The tokenizer files to copy into an HF export (``--tokenizer``), found before any work is done."""
    if not args.tokenizer:
        return []
    if args.to != "hf":
        raise _BadArguments(f"--tokenizer goes with --to hf, not --to {args.to}")
    from adapter.checkpoint.formats.hf import tokenizer_files

    folder = Path(args.tokenizer)
    if not folder.is_dir():
        raise _BadArguments(f"--tokenizer {folder}: not a folder")
    return tokenizer_files(folder)


def _hand_back(args: argparse.Namespace, layout, cfg) -> int:
    """``convert --to internevo`` of a training checkpoint with optimizer state: InternEvo's whole training
    state (``train.internevo_export``)."""
    from adapter.train.internevo_export import HandBack, RunSettings, SizeError

    if args.dtype:
        raise _BadArguments("--dtype casts weights; a training checkpoint is handed back in its own dtype")
    try:
        back = HandBack.prepare(Path(args.src), layout, args.zero1, RunSettings.from_config(cfg) if cfg else None,
                                args.dp)
    except SizeError as exc:
        raise _BadArguments(str(exc)) from None
    if args.dry_run:
        print(f"read  {back.src} (training checkpoint, step {back.step}, data-parallel size {back.dp})")
        for name in back.files():
            print(f"write {Path(args.dst) / name}")
        return 0
    back.write(Path(args.dst), overwrite=args.overwrite)
    print(args.dst)
    return 0


def _convert_training(args: argparse.Namespace, src: Checkpoint, layout: ParallelLayout, cfg) -> int:
    """``--to internevo`` of a training checkpoint: its whole state, in the adapter's form (``EPILOG``).
    Sizes the trainer could not resume at are refused before any state file is read."""
    from adapter.checkpoint.errors import CheckpointError
    from adapter.train.state_convert import (check_resumable_layout, open_training, planned_training_files,
                                             skipped_files, write_training)

    if args.dtype:
        raise _BadArguments("--dtype casts the weights of a training checkpoint away from the optimizer's; pass "
                            "--weights-only to write cast weights alone")
    if args.zero1 or args.dp:
        raise _BadArguments("--zero1 and --dp size InternEvo's optimizer and sampler files; the adapter's form "
                            "(--state adapter) has no ZeRO partitions and resumes at any data-parallel size")
    try:
        check_resumable_layout(src.model, layout)
    except CheckpointError as exc:
        raise _BadArguments(str(exc)) from None
    source = open_training(src)
    if args.dry_run:
        print(f"read  {src.path} ({source.state.kind} training checkpoint, step {source.state.step}, "
              f"{len(src.tensors)} tensors)")
        for name in planned_training_files(source, layout):
            print(f"write {Path(args.dst) / name}")
        for name in skipped_files(source):
            print(f"skip  {src.path / name}")
        return 0
    from adapter.train.internevo_export import RunSettings

    write_training(source, layout, args.dst, overwrite=args.overwrite,
                   settings=RunSettings.from_config(cfg).to_dict() if cfg else None)
    print(args.dst)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    from adapter.atomic import OverlapError, TargetExistsError, check_separate, check_target
    from adapter.checkpoint.convert import (DTYPES, compare, describe, dtype_notes, dumps, open_checkpoint,
                                            planned_files, write_checkpoint)
    from adapter.checkpoint.errors import CheckpointError
    from adapter.config import ConfigError, read_config

    try:
        cfg = layout_cfg = None
        if args.config:
            cfg, layout_cfg = read_config(args.config)
        model = cfg.model if cfg else None
        if args.command == "inspect":
            from adapter.train.state_inspect import read_state

            info = describe(open_checkpoint(args.path, model), tensors=args.tensors)
            print(dumps({**info, "state": read_state(args.path).info}))
            return 0
        if args.command == "verify":
            a, b = open_checkpoint(args.a, model), open_checkpoint(args.b, model)
            for note in dtype_notes(a) + dtype_notes(b):  # reported, not a difference: the tensors are compared
                print(f"note: {note}", file=sys.stderr)
            problems = compare(a, b, args.atol)
            for line in problems:
                print(line)
            print("match" if not problems else f"{len(problems)} differences", file=sys.stderr)
            return 0 if not problems else 1
        inputs = [args.src, *([args.config] if args.config else []), *([args.tokenizer] if args.tokenizer else [])]
        check_separate(inputs, args.dst)
        tokenizer = _tokenizer(args)
        src = open_checkpoint(args.src, model)
        layout = _layout(args, src.model, layout_cfg)
        check_target(args.dst, args.overwrite)
        kind = "weights-only"
        if args.to == "internevo" and not args.weights_only:
            from adapter.train.state_inspect import training_kind

            kind = training_kind(src.path)
        if kind != "weights-only":
            if args.state == "adapter" or kind == "deepspeed":  # the latter refused there, with the reason
                return _convert_training(args, src, layout, cfg)
            if kind == "internevo":
                raise _BadArguments(f"{src.path} is InternEvo's own training checkpoint already: --state adapter "
                                    "converts it to the adapter's form, which can then be handed back at another "
                                    "layout or ZeRO size")
            return _hand_back(args, layout, cfg)
        if args.zero1 or args.dp:
            raise _BadArguments("--zero1 and --dp go with --to internevo from a training checkpoint (one with "
                                "optimizer/)")
        if args.dry_run:
            print(f"read  {src.path} ({src.format}, {src.generation}, {len(src.tensors)} tensors)")
            for name in planned_files(args.to, layout) + [p.name for p in tokenizer]:
                print(f"write {Path(args.dst) / name}")
            return 0
        write_checkpoint(src, args.to, args.dst, layout, dtype=DTYPES[args.dtype] if args.dtype else None,
                         overwrite=args.overwrite, extra_files=tokenizer)
        print(args.dst)
        return 0
    except BrokenPipeError:
        return closed_pipe()
    except (CheckpointError, ConfigError, OverlapError, _BadArguments) as exc:
        print(f"internlm-ckpt: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, CheckpointError) else 2
    except (TargetExistsError, OSError) as exc:
        print(f"internlm-ckpt: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
