"""``internlm-config``: translate an InternEvo training config for DeepSpeed and megatron-core."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from adapter.cli.common import closed_pipe, positive_int
from adapter.config.errors import ConfigError

DESCRIPTION = """\
Translate an InternEvo (InternLM) training config into a DeepSpeed ZeRO stage-1 JSON, a megatron-core
TransformerConfig and the equivalent Megatron-LM arguments, with a report of every field that maps
exactly, approximately or not at all.

Configs are Python files as InternEvo writes them (or YAML with the same sections). They are evaluated
safely (literals, arithmetic, earlier names, dict(...), f-strings, os.environ reads); anything else is
refused unless you pass --trust-config, which executes the file as InternEvo does.
"""

EPILOG = """\
examples:
  internlm-config check internlm_configs/7B_demo.py
  internlm-config check internlm_configs/30B_demo.py --nodes 8 --gpus-per-node 8
  internlm-config convert internlm_configs/7B_demo.py --world-size 64 --out converted/7B
  internlm-config convert my_config.yaml --world-size 8 --out out --overwrite

convert writes into --out (atomically: the folder appears complete or not at all):
  ds_config.json           DeepSpeed config (ZeRO stage 1) for the training entry point
  transformer_config.yaml  megatron-core TransformerConfig fields, model options, parallel layout
  megatron_args.txt        equivalent Megatron-LM pretrain_gpt.py arguments
  report.md, report.json   where every field went: exact, approximate (how) or unsupported (why)

--out must not hold the config (its own folder, or one around it, after resolving symlinks and ..), and
--overwrite replaces only a folder this tool wrote (it leaves a .internlm-adapter.json listing its files).

exit status: 0 ok, 2 bad config or arguments (including an --out that holds the config), 1 other errors
(e.g. the output folder exists, no space left).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internlm-config", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,convert}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="InternEvo config file (.py, or .yaml/.yml)")
        p.add_argument("--trust-config", action="store_true",
                       help="execute a Python config as InternEvo does (runs its code; only for files you trust)")
        world = p.add_mutually_exclusive_group()
        world.add_argument("--world-size", type=positive_int, metavar="N",
                           help="total processes; enables the data-parallel checks and train_batch_size")
        world.add_argument("--nodes", type=positive_int, metavar="N", help="number of nodes (with --gpus-per-node)")
        p.add_argument("--gpus-per-node", type=positive_int, metavar="G", help="processes per node (with --nodes)")

    check = sub.add_parser("check", help="validate only (fast; imports neither torch nor megatron)",
                           description="Validate a config: load it safely, normalise it and check it as a whole.",
                           epilog="example:\n  internlm-config check internlm_configs/7B_demo.py --world-size 64",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    common(check)
    check.add_argument("--json", action="store_true", help="print the normalised parallel layout as JSON")

    convert = sub.add_parser("convert", help="write the DeepSpeed/megatron-core translations and the report",
                             description="Translate a config and write the outputs listed below.",
                             epilog=EPILOG.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    common(convert)
    convert.add_argument("--out", metavar="DIR", help="output folder (default: ./<config name>.converted)")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an output folder this tool wrote (never one it did not write)")
    convert.add_argument("--dry-run", action="store_true", help="print the files that would be written and stop")
    convert.add_argument("-v", "--verbose", action="store_true", help="print the report summary")
    return parser


def _world_size(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int | None:
    if args.nodes is not None or args.gpus_per_node is not None:
        if args.nodes is None or args.gpus_per_node is None:
            parser.error("--nodes and --gpus-per-node go together")
        return args.nodes * args.gpus_per_node
    return args.world_size


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world_size = _world_size(args, parser)
    from adapter.atomic import OverlapError
    from adapter.config import read_config

    try:
        cfg, layout = read_config(args.config, trust=args.trust_config, world_size=world_size)
        if args.command == "check":
            if args.json:
                print(json.dumps({"source": cfg.source, "family": cfg.model.family, "tensor": layout.tp,
                                  "pipeline": layout.pp, "virtual_pipeline": layout.vpp, "data": layout.dp,
                                  "sequence_parallel": layout.sequence_parallel,
                                  "layers": [[list(c) for c in s] for s in layout.stages]}))
            else:
                dp = f" dp={layout.dp}" if layout.dp is not None else ""
                print(f"ok: {cfg.source}: {cfg.model.family}, {cfg.model.num_layers} layers, "
                      f"tp={layout.tp} pp={layout.pp} vpp={layout.vpp}{dp}")
            return 0
        return _convert(args, cfg, layout)
    except BrokenPipeError:
        return closed_pipe()
    except (ConfigError, OverlapError) as exc:
        print(f"internlm-config: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"internlm-config: error: {exc}", file=sys.stderr)
        return 1


def _convert(args: argparse.Namespace, cfg, layout) -> int:
    if not args.verbose:  # megatron-core warns about missing Transformer Engine/Apex on import
        warnings.filterwarnings("ignore", category=UserWarning)
    from adapter.atomic import check_separate, check_target
    from adapter.config.convert import render, write_outputs
    from adapter.config.report import report_dict

    out = Path(args.out) if args.out else Path(f"{Path(args.config).stem}.converted")
    check_separate([args.config], out)
    if args.dry_run:  # translate and validate everything, write nothing
        check_target(out, args.overwrite)
        for name, text in render(cfg, layout).items():
            print(f"{out / name}\t{len(text.encode())} bytes")
        return 0
    write_outputs(cfg, layout, out, overwrite=args.overwrite)
    if args.verbose:
        summary = report_dict(cfg, layout)["summary"]
        print(f"{summary['exact']} exact, {summary['approximate']} approximate, "
              f"{summary['unsupported']} unsupported (see {out / 'report.md'})", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
