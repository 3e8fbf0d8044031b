"""The ``mpu`` object DeepSpeed expects, over megatron-core's ``parallel_state``.

DeepSpeed reads the data-parallel group (for ZeRO partitioning and gradient averaging) and the
model-parallel group (to reduce the gradient norm and the overflow flag over tensor × pipeline ranks, and
to name checkpoint files). ``parallel_state`` itself cannot be passed: it has no
``get_model_parallel_rank``/``get_model_parallel_world_size``, and DeepSpeed needs the model-parallel rank
to be unique over tensor × pipeline, or pipeline stages overwrite each other's checkpoint files.

Sequence-parallel methods are deliberately absent: DeepSpeed reads ``get_sequence_parallel_*`` as Ulysses
sequence parallelism (not Megatron's), and the mere presence of ``initialize_sequence_parallel`` makes it
ignore the mpu.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMPU:
    """Data parallel = megatron's data-parallel group; model parallel = its tensor × pipeline group."""

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=ps.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=ps.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    # DeepSpeed's older names for the pipeline group
    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
