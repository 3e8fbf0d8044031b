"""Checkpoints as Megatron-LM itself writes them: Transformer Engine's layer names, ``_extra_state`` entries,
and (legacy files) ``args``, RNG and optimizer states beside the model.

The files are built from ours by doing what Megatron-LM's ``save_checkpoint`` does on a GPU run
(``megatron/training/checkpointing.py``: ``generate_state_dict`` with the TE layer spec)."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random

import numpy as np
import pytest
import torch

from adapter.checkpoint.convert import compare, open_checkpoint, target_layout, write_checkpoint
from adapter.checkpoint.formats.mcore import METADATA
from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.safe_load import load_dcp_metadata
from adapter.model.mapping import TE_NAMES
from tests.checkpoint.test_bridge import tiny_model, write_internevo
from tests.model.workers import random_logical

TO_TE = {local: te for te, local in TE_NAMES.items()}


def te_names(state: dict) -> dict:
    """A chunk's state dict under the TE spec's names, with TE's ``_extra_state`` entries."""
    out = {}
    for key, value in state.items():
        for local, te in TO_TE.items():
            if key.endswith("." + local):
                key = key[: -len(local)] + te
        out[key] = value
        if key.endswith("linear_qkv.weight"):
            out[key.replace(".weight", "._extra_state")] = io.BytesIO(b"fp8 meta")  # older TE
            out[key.replace("linear_qkv.weight", "core_attention._extra_state")] = None
        if key.endswith("linear_proj.weight"):
            out[key.replace(".weight", "._extra_state")] = torch.zeros(0, dtype=torch.uint8)  # newer TE
    return out


def megatron_lm_entries(tp: int, pp: int) -> dict:
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              params_dtype=torch.bfloat16, model_type=ModelType.encoder_or_decoder,
                              attention_backend=AttnBackend.auto, data_path=["1.0", "corpus"], seed=1234)
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
           "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}
    optimizer = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(5.0)}},
                               "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]},
                 "grad_scaler": None}
    return {"args": args, "checkpoint_version": 3.0, "iteration": 500, "optimizer": optimizer,
            "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": 500, "decay_style": "cosine"},
            "rng_state": [rng], "num_floating_point_operations_so_far": 1.5e15}


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


@pytest.mark.parametrize("family", ["internlm1", "internlm2"])
def test_megatron_lm_legacy_files_are_read(tmp_path, family):
    model = tiny_model(family)
    logical = random_logical(model, 41)
    src = open_checkpoint(write_internevo(tmp_path / "src", logical, model, 2, 1, 1))
    ours = write_checkpoint(src, "mcore-legacy", tmp_path / "ours", target_layout(model, 2, 2, 2))
    files = sorted(ours.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    for path in files:
        state = torch.load(path, weights_only=True)
        state.update({k: te_names(v) for k, v in state.items() if k.startswith("model")})
        state.update(megatron_lm_entries(2, 2))
        torch.save(state, path)
    assert "args" in torch.load(files[0], weights_only=False)
    back = open_checkpoint(ours, model)
    assert compare(back, src) == [] and back.generation == "mcore-legacy (Transformer Engine names)"
    # a hostile object among the extras is refused, not run, and named with its file
    _Evil.marker = tmp_path / "pwned"
    state = torch.load(files[-1], weights_only=False)
    state["args"].seed = _Evil()
    torch.save(state, files[-1])
    with pytest.raises(CheckpointError, match=r"mp_rank_01_001/model_optim_rng.pt: cannot be read: it asks to load posix.system"):
        open_checkpoint(ours, model)
    assert not _Evil.marker.exists()


def test_megatron_legacy_key_sets_are_checked(tmp_path):
    model = tiny_model("internlm2")
    src = open_checkpoint(write_internevo(tmp_path / "src", random_logical(model, 42), model, 1, 1, 1))
    ours = write_checkpoint(src, "mcore-legacy", tmp_path / "ours", target_layout(model, 2, 1, 1))
    path = ours / "iter_0000000" / "mp_rank_01" / "model_optim_rng.pt"
    original = torch.load(path, weights_only=True)
    for edit, message in [
        (lambda sd: sd.pop("decoder.layers.3.mlp.linear_fc2.weight"), r"mp_rank_01.*missing tensor decoder.layers.3.mlp"),
        (lambda sd: sd.update({"decoder.layers.0.mystery.weight": torch.zeros(1)}), "unexpected tensor decoder.layers.0.mystery"),
        (lambda sd: sd.update({"output_layer.weight": torch.zeros(3, 64)}), r"output_layer.weight has shape \(3, 64\)"),
    ]:
        state = {**original, "model": dict(original["model"])}
        edit(state["model"])
        torch.save(state, path)
        with pytest.raises(CheckpointError, match=message):
            open_checkpoint(ours, model)


def test_torch_dist_with_transformer_engine_names_is_read(tmp_path):
    model = tiny_model("internlm1")
    logical = random_logical(model, 43)
    src = open_checkpoint(write_internevo(tmp_path / "src", logical, model, 1, 1, 1))
    folder = write_checkpoint(src, "mcore", tmp_path / "dist", None)
    metadata = load_dcp_metadata(folder / METADATA)

    def rename(key: str) -> str:
        return next((key[: -len(local)] + te for local, te in TO_TE.items() if key.endswith("." + local)), key)

    metadata.state_dict_metadata = {rename(k): v for k, v in metadata.state_dict_metadata.items()}
    metadata.storage_data = {type(k)(rename(k.fqn), k.offset): v for k, v in metadata.storage_data.items()}
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in metadata.state_dict_metadata
    (folder / METADATA).write_bytes(pickle.dumps(metadata))
    back = open_checkpoint(folder)
    assert compare(back, src) == [] and back.generation == "mcore-torch_dist (Transformer Engine names)"
    assert open_checkpoint(src.path).generation == "internevo"
