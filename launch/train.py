"""Train an InternLM model from an InternEvo config with DeepSpeed ZeRO-1 over megatron-core.

    deepspeed --num_gpus 8 launch/train.py --config internlm_configs/7B_demo.py
    deepspeed --hostfile hosts --num_nodes 4 --num_gpus 8 launch/train.py --config my_config.py
    torchrun --nproc_per_node 8 launch/train.py --config my_config.py

Without CUDA the same command trains on the CPU over gloo (one process per "GPU"):

    deepspeed --num_gpus 2 launch/train.py --config internlm_configs/tiny.py

The world size must be a multiple of tensor × pipeline size; the rest is data parallelism.

Exit status: 0 done; 2 a bad config (one line, printed once); 1 anything else, one line per rank that met it:
bad data, a bad checkpoint, unusable storage, or an unexpected error, whose traceback goes to
``<run-dir>/error_rank<r>.log`` (and to stderr with ``--verbose``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from adapter.config import ConfigError, read_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="InternEvo config (.py or .yaml)")
    parser.add_argument("--trust-config", action="store_true", help="execute the config file as InternEvo does")
    parser.add_argument("--seed", type=int, default=1024, help="model initialisation seed (InternEvo's default)")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOPS of one device, to report MFU")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps in this launch")
    parser.add_argument("--run-dir", help="folder for metrics.jsonl (every step's numbers at full precision) and "
                        "TensorBoard logs (default: runs/<JOB_NAME>)")
    parser.add_argument("--tensorboard-dir", help="TensorBoard folder (default: the config's tensorboard_folder, "
                        "else <run-dir>/tensorboard)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an unexpected error (it "
                        "always goes to <run-dir>/error_rank<r>.log)")
    # the deepspeed launcher appends --local_rank; torchrun sets LOCAL_RANK instead
    args, _ = parser.parse_known_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg, layout = read_config(args.config, trust=args.trust_config, world_size=world)
    except ConfigError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    from adapter.runtime.dist import destroy_distributed
    from adapter.train.failure import report_unexpected
    from adapter.train.loop import RunOptions, train

    from adapter.checkpoint.errors import CheckpointError
    from adapter.checkpoint.storage import StorageError
    from adapter.data.tokenized import DataError

    rank = int(os.environ.get("RANK", "0"))
    options = RunOptions(seed=args.seed, peak_tflops=args.peak_tflops, max_steps=args.max_steps,
                         tensorboard_dir=args.tensorboard_dir, run_dir=args.run_dir)
    try:
        train(cfg, layout, options)
    except (ConfigError, StorageError) as exc:  # every rank raises it: one line, once
        if rank == 0:
            print(f"train: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except (DataError, CheckpointError) as exc:  # bad input met by the ranks that read it: one line each
        print(f"train: error (rank {rank}): {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug or a failing component: one line per raising rank, the traceback in a file
        report_unexpected(exc, rank, options.folder(cfg), args.verbose)
        return 1
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
