"""Handing a run back to InternEvo 0.5.2 (``train.internevo_export``), held against InternEvo's own files.

InternEvo's full training checkpoints (``ckpt/4`` and ``ckpt/8`` of ``internlm2_traj_{dp1,zero2}``, one ZeRO
rank and two) are read into the adapter's form (``internevo_state.import_checkpoint``) and written back: every
training-state file must come back byte for byte (the optimizer partitions with their ``ParallelMode`` and
plan, the plan files, sampler with its numpy arrays, scheduler, context, marker), the model tensors bit for
bit. At another ZeRO size the plan must be InternEvo's partition rule, computed here from the rule itself;
and since both fixtures have the same model sizes, InternEvo's own plan of the other fixture is that plan
too. All single-process, no training.
"""

from __future__ import annotations

import dataclasses
import enum
import pickletools
import shutil
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter.checkpoint.convert import open_checkpoint, target_layout
from adapter.checkpoint.errors import CheckpointError
from adapter.config import read_config
from adapter.train.internevo_export import ZERO1, HandBack, RunSettings, save
from adapter.train.internevo_state import (PARALLEL_MODE, ParallelMode, _load, import_checkpoint,
                                           import_optimizer, parameter_order, sampler_state)
from adapter.train.state_inspect import read_state
from tests.conftest import FIXTURES

DP1, ZERO2 = FIXTURES / "internlm2_traj_dp1", FIXTURES / "internlm2_traj_zero2"
CASES = [(fixture, step) for fixture in (DP1, ZERO2) for step in (4, 8)]
STATE_FILES = ("optimizer_", "gpus-", "sampler.pt", "schedulder.pt", "context.pt", "topo_", ".step")


def _id(case) -> str:
    return f"{case[0].name[len('internlm2_traj_'):]}-ckpt{case[1]}"


def load_internevo(path: Path):
    """Any InternEvo training-state file through the reader's allow-lists (``ParallelMode`` as a stand-in)."""
    from adapter.checkpoint.io.safe_load import megatron_globals

    return _load(path, [(ParallelMode, PARALLEL_MODE), *megatron_globals()])


def assert_same(a, b, where: str) -> None:
    """Same structure: types, key order, values; tensors of the same dtype, shape, ``requires_grad`` and bits."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), where
        assert torch.equal(a.detach().view(-1).view(torch.uint8), b.detach().view(-1).view(torch.uint8)), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def pickle_bytes(path: Path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def plan_by_rule(params: dict[str, torch.Size], zero: int) -> tuple[list[list[str]], list[list[str]]]:
    """InternEvo's ``_partition_param_list`` (``hybrid_zero_optim.py``), from its description in
    ``INTERNEVO_FORMAT.md`` §7.5, written independently of the code under test: parameters (``params`` in
    ``model.parameters()`` order) sorted by element count, largest first, ties in order; each to the ZeRO
    rank with the fewest elements so far (the lowest such rank); named ``"{sorted index}_{dims}"``.
    Returns the plan and, per rank, the parameters' names in flat order."""
    names = list(params)
    sizes = [int(np.prod(params[n])) for n in names]
    order = sorted(range(len(names)), key=lambda i: (-sizes[i], i))
    plan, keys, totals = [[] for _ in range(zero)], [[] for _ in range(zero)], [0] * zero
    for index, i in enumerate(order):
        rank = min(range(zero), key=lambda r: (totals[r], r))
        plan[rank].append("_".join(str(x) for x in (index, *params[names[i]])))
        keys[rank].append(names[i])
        totals[rank] += sizes[i]
    return plan, keys


def assert_flat_is_model(flat: torch.Tensor, keys: list[str], model: dict[str, torch.Tensor], where: str) -> None:
    """An fp32 run's fp32 master partition is its parameters, flattened in plan order (bit for bit)."""
    assert torch.equal(flat.detach(), torch.cat([model[k].reshape(-1) for k in keys])), where


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory) -> dict:
    """Each InternEvo checkpoint → the adapter's form → InternEvo's again, at its own layout and ZeRO size."""
    out = {}
    for fixture, step in CASES:
        root = tmp_path_factory.mktemp(_id((fixture, step)))
        cfg, _ = read_config(fixture / "config.py")
        ours = import_checkpoint(fixture / "ckpt" / str(step), cfg, root / "ours")
        back = HandBack.prepare(ours, target_layout(cfg.model, 1, 1, 1)).write(root / "back")
        out[(fixture, step)] = (cfg, ours, back)
    return out


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_internevo_checkpoint_comes_back_byte_for_byte(round_trips, case):
    fixture, step = case
    cfg, ours, back = round_trips[case]
    original = fixture / "ckpt" / str(step)
    assert not (ours / "optimizer_tp0_pp0_zo0.pt").exists() and (ours / "optimizer" / "state.pt").exists()
    written = {p.name for p in back.iterdir()} - {".internlm-adapter.json"}
    compared = [p for p in original.iterdir() if p.name.startswith(STATE_FILES) or p.name.endswith(STATE_FILES)]
    assert {p.name for p in compared} <= written
    assert len(compared) == len(list(original.iterdir())) - 2  # all but model_tp0_pp0.pt and model_config.pt
    for path in compared:
        assert_same(load_internevo(back / path.name), load_internevo(path), path.name)  # readable differences
        assert pickle_bytes(back / path.name) == pickle_bytes(path), path.name
        assert (back / path.name).read_bytes() == path.read_bytes(), path.name
    ours_model, theirs = (torch.load(f / "model_tp0_pp0.pt", weights_only=True) for f in (back, original))
    assert_same(dict(ours_model), dict(theirs), "model_tp0_pp0.pt")
    # the reader put each partition's pieces under the right names: in fp32 the master weights are the model
    assert_same(dict(torch.load(ours / "optimizer" / "fp32" / "model_tp0_pp0.pt", weights_only=True)),
                dict(theirs), "optimizer/fp32")


def test_parallel_mode_is_pickled_as_internevos_enum(tmp_path, monkeypatch):
    """``optimizer_mode`` must come back in InternEvo as its own ``ParallelMode.ZERO1``: the bytes equal those
    pickle writes for an ``Enum`` member of that name (with a stand-in module of that name registered, as
    InternEvo's would be), that module unpickles them as its member, and the adapter's reader as its stand-in."""
    names = ["internlm", "internlm.core", "internlm.core.context", "internlm.core.context.process_group_initializer"]
    mode = enum.Enum("ParallelMode", {"GLOBAL": "global", "DATA": "data", "ZERO1": "zero1"})
    mode.__module__ = names[-1]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].ParallelMode = mode
    save({"optimizer_mode": ZERO1}, tmp_path / "ours.pt")
    torch.save({"optimizer_mode": mode.ZERO1}, tmp_path / "enum.pt")
    assert pickle_bytes(tmp_path / "ours.pt") == pickle_bytes(tmp_path / "enum.pt")
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(pickle_bytes(tmp_path / "ours.pt"))]
    assert ("GLOBAL", "internlm.core.context.process_group_initializer ParallelMode") in ops
    assert torch.load(tmp_path / "ours.pt", weights_only=False)["optimizer_mode"] is mode.ZERO1
    monkeypatch.delitem(sys.modules, names[-1])
    assert load_internevo(tmp_path / "ours.pt") == {"optimizer_mode": ParallelMode("zero1")}


@pytest.mark.parametrize("fixture, zero, other", [(ZERO2, 1, DP1), (DP1, 2, ZERO2)], ids=["zero2-at-1", "dp1-at-2"])
def test_another_zero_size_gets_internevos_plan_and_the_same_state(round_trips, tmp_path, fixture, zero, other):
    cfg, ours, _ = round_trips[(fixture, 4)]
    back = HandBack.prepare(ours, target_layout(cfg.model, 1, 1, 1), zero1=1)
    folder = dataclasses.replace(back, zero=zero).write(tmp_path / "back")  # dp1 at zero 2: past the dp check
    model = torch.load(folder / "model_tp0_pp0.pt", weights_only=True)
    plan, keys = plan_by_rule({k: v.shape for k, v in model.items()}, zero)
    expected = [plan, [[] for _ in range(zero)]]
    theirs = load_internevo(other / "ckpt" / "4" / "optimizer_tp0_pp0_zo0.pt")["zero_devide_optim_plan"]
    assert expected == theirs  # the rule, and InternEvo's own plan for the same model at this ZeRO size
    dp = back.dp
    for z in range(zero):
        written = load_internevo(folder / f"optimizer_tp0_pp0_zo{z}.pt")
        assert written["zero_devide_optim_plan"] == expected
        n = sum(int(np.prod([int(d) for d in name.split("_")[1:]])) for name in expected[0][z])
        assert written["flat_fp32_weights"][0].shape == (n,) == written["base_optim_states"]["state"][0]["exp_avg"].shape
        assert_flat_is_model(written["flat_fp32_weights"][0], keys[z], model, f"zo{z}")
    assert sorted(p.name for p in folder.glob("gpus-*")) == [
        f"gpus-{dp}_wp-0_tp-0_dp-{d}_pp-0_zo-{d % zero}.pt" for d in range(dp)]
    assert all(torch.load(p, weights_only=True) == expected for p in folder.glob("gpus-*"))
    # read back: the same state per tensor as InternEvo's own files hold
    import_optimizer(folder, cfg.model, tmp_path / "again")
    import_optimizer(fixture / "ckpt" / "4", cfg.model, tmp_path / "orig")
    for kind in ("fp32", "exp_avg", "exp_avg_sq"):
        a = torch.load(tmp_path / "again" / "optimizer" / kind / "model_tp0_pp0.pt", weights_only=True)
        b = torch.load(tmp_path / "orig" / "optimizer" / kind / "model_tp0_pp0.pt", weights_only=True)
        assert_same(a, b, kind)
    assert torch.load(tmp_path / "again" / "optimizer" / "state.pt") == {"steps": [4]}


def test_another_tensor_and_pipeline_layout_reads_back_the_same_logical_state(round_trips, tmp_path):
    """tp 2 × pp 2 × ZeRO 2: each (tensor, pipeline) rank partitioned by the rule over its own model file."""
    cfg, ours, _ = round_trips[(ZERO2, 8)]
    folder = HandBack.prepare(ours, target_layout(cfg.model, 2, 2, 1), zero1=2).write(tmp_path / "back")
    for t in range(2):
        for p in range(2):
            model = torch.load(folder / f"model_tp{t}_pp{p}.pt", weights_only=True)
            plan, keys = plan_by_rule({k: v.shape for k, v in model.items()}, 2)
            expected = [plan, [[], []]]
            for z in range(2):
                written = load_internevo(folder / f"optimizer_tp{t}_pp{p}_zo{z}.pt")
                assert written["zero_devide_optim_plan"] == expected
                assert_flat_is_model(written["flat_fp32_weights"][0], keys[z], model, f"tp{t} pp{p} zo{z}")
            assert torch.load(folder / f"gpus-8_wp-0_tp-{t}_dp-1_pp-{p}_zo-1.pt", weights_only=True) == expected
    import_optimizer(folder, cfg.model, tmp_path / "again")
    for kind in ("fp32", "exp_avg", "exp_avg_sq"):
        a = open_checkpoint(tmp_path / "again" / "optimizer" / kind, cfg.model)
        b = open_checkpoint(ours / "optimizer" / kind, cfg.model)
        assert a.layout.tp == a.layout.pp == 2
        assert_same(dict(a.tensors), dict(b.tensors), kind)


# ---- InternLM1: its parameter order is not its file order


def test_internlm1_parameter_order_follows_internevo_source():
    """InternEvo 0.5.2 registers ``MHA.wqkv`` (``model/modules/mha.py:107``) before ``out_proj`` (``:117``), so
    ``model.parameters()`` lists ``Wqkv`` first; ``InternLM1Decoder`` (``model/modeling_internlm.py:109``)
    registers ``internlm1_mha_save_convert`` (``model/utils.py:16-22``), which pops ``wqkv.*`` and re-inserts
    them as ``Wqkv.*`` after ``out_proj.*`` in the state dict. The block's other modules keep their places:
    ``norm1``, ``norm2`` (``modeling_internlm.py:114-115``), then ``mlp`` w1, w2, w3 (``mlp.py:90-92``)."""
    keys = list(torch.load(FIXTURES / "internlm1_tiny" / "ckpt" / "model_tp0_pp0.pt", weights_only=True))
    block = ["mixer.Wqkv.weight", "mixer.Wqkv.bias", "mixer.out_proj.weight", "mixer.out_proj.bias",
             "norm1.weight", "norm2.weight", "mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight"]
    saved = block[2:4] + block[0:2] + block[4:]  # the hook's order, which InternEvo's file has
    assert keys == ["embedding.weight", *[f"blocks.{i}.{k}" for i in range(2) for k in saved], "norm.weight",
                    "head.weight"]
    expected = ["embedding.weight", *[f"blocks.{i}.{k}" for i in range(2) for k in block], "norm.weight",
                "head.weight"]
    assert parameter_order(keys, "internlm1") == expected
    assert parameter_order(expected, "internlm1") == expected  # whatever order the keys come in
    chunked = [f"1.model.{k}" for k in keys]
    assert parameter_order(chunked, "internlm1") == [f"1.model.{k}" for k in expected]
    assert parameter_order(keys, "internlm2") == keys


def _our_checkpoint(folder: Path, cfg, seed: int = 0) -> Path:
    """An adapter training checkpoint of ``cfg``'s model with random weights (in the model's dtype) and fp32
    optimizer state, laid out as ``state_files.save_checkpoint`` does, at step 3 of a 2-rank data-parallel run."""
    from adapter.checkpoint.formats.internevo import model_config_dict, shard_state_dict
    from adapter.data.sampler import BatchSampler
    from tests.model.workers import random_logical

    layout = target_layout(cfg.model, 1, 1, 1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.model.dtype]
    for sub, shift in (("", 0), ("optimizer/fp32", 0), ("optimizer/exp_avg", 1), ("optimizer/exp_avg_sq", 2)):
        (folder / sub).mkdir(parents=True)
        logical = random_logical(cfg.model, seed=seed + shift)
        logical = {k: v.to(dtype) if not sub else v.abs() if sub.endswith("_sq") else v for k, v in logical.items()}
        torch.save(shard_state_dict(logical, cfg.model, layout, 0, 0), folder / sub / "model_tp0_pp0.pt")
        torch.save(model_config_dict(cfg.model), folder / sub / "model_config.pt")
    torch.save({"steps": [3]}, folder / "optimizer" / "state.pt")
    sampler = BatchSampler(40, 2, None, 7, 0, 2)
    for _ in zip(range(3), sampler):
        pass
    torch.save(sampler.state_dict(), folder / "sampler.pt")
    torch.save({"batch_count": 2, "num_consumed_samples_in_epoch": 12, "num_consumed_tokens": 999,
                "inf_nan_skip_batches": 0, "tensorboard_folder": None, "step_count": 3,
                "grad_scaler": {"_scale": 4096.0, "_growth_step": 3, "_hysteresis_step": 1}}, folder / "context.pt")
    torch.save({"step_count": 3, "base_lr": cfg.adam.lr, "internevo": RunSettings.from_config(cfg).to_dict()},
               folder / "schedulder.pt")
    torch.save({"step": 3}, folder / "3.step")
    return folder


def test_internlm1_bf16_run_at_tp2_pp2_vpp2_round_trip(tmp_path):
    """A 4-layer bf16 InternLM1 run handed back at tp 2 × pp 2 × 2 chunks × ZeRO 2 and read again: the same
    state per tensor; each plan is the rule applied in InternEvo's parameter order (``Wqkv`` before
    ``out_proj``, chunk 0's parameters before chunk 1's), each fp32 partition is the fp32 master weights in
    that order, the groups say bf16 and the loss scale is the run's."""
    from adapter.checkpoint.formats.internevo import shard_state_dict

    text = (FIXTURES / "internlm1_tiny" / "config.py").read_text()
    edits = {"NUM_LAYER = 2": "NUM_LAYER = 4", 'dtype="torch.float32"': 'dtype="torch.bfloat16"'}
    for old, new in edits.items():
        assert text.count(old) == 1
        text = text.replace(old, new)
    (tmp_path / "cfg.py").write_text(text)
    cfg, _ = read_config(tmp_path / "cfg.py")
    ours = _our_checkpoint(tmp_path / "ours", cfg)
    layout = target_layout(cfg.model, 2, 2, 2)
    folder = HandBack.prepare(ours, layout, zero1=2).write(tmp_path / "back")
    masters = open_checkpoint(ours / "optimizer" / "fp32", cfg.model).tensors
    for t in range(2):
        for p in range(2):
            model = torch.load(folder / f"model_tp{t}_pp{p}.pt", weights_only=True)
            assert {v.dtype for v in model.values()} == {torch.bfloat16}
            chunks = [k.split(".model.")[0] for k in model]
            assert chunks == sorted(chunks) and set(chunks) == {"0", "1"}
            plan, keys = plan_by_rule({k: model[k].shape for k in parameter_order(list(model), "internlm1")}, 2)
            fp32 = shard_state_dict(masters, cfg.model, layout, t, p)
            for z in range(2):
                written = load_internevo(folder / f"optimizer_tp{t}_pp{p}_zo{z}.pt")
                assert written["zero_devide_optim_plan"] == [plan, [[], []]]
                assert_flat_is_model(written["flat_fp32_weights"][0], keys[z], fp32, f"tp{t} pp{p} zo{z}")
                groups = written["base_optim_states"]["param_groups"]
                assert [g["dtype"] for g in groups] == [torch.bfloat16, None]
                assert written["grad_scaler"] == {"_scale": 4096.0, "_growth_step": 3, "_hysteresis_step": 1}
    import_optimizer(folder, cfg.model, tmp_path / "again")
    for kind in ("fp32", "exp_avg", "exp_avg_sq"):
        a = open_checkpoint(tmp_path / "again" / "optimizer" / kind, cfg.model)
        assert (a.layout.tp, a.layout.pp, a.layout.vpp) == (2, 2, 2)
        b = open_checkpoint(ours / "optimizer" / kind, cfg.model)
        assert_same(dict(sorted(a.tensors.items())), dict(sorted(b.tensors.items())), kind)  # logical: any order
    sampler = load_internevo(folder / "sampler.pt")
    assert (sampler["data_world_size"], sampler["batch_count"], sampler["num_consumed_samples_in_epoch"]) == (2, 3, 6)
    assert sampler["indices"].dtype == np.int64 and len(sampler["indices"]) == 40


# ---- mlp_layer_fusion: InternEvo's MLP holds w1 and w3 as one parameter


def fused_parameters(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters of an InternLM2 ``mlp_layer_fusion=True`` model, in ``model.parameters()`` order, from its
    model file, written from InternEvo 0.5.2's source independently of the code under test: ``FeedForward``
    registers ``fused_w1_w3`` and then ``w2`` (``model/modules/mlp.py:84-85``), the fused weight of a tensor
    rank being ``torch.cat([w1, w3], dim=0)`` of that rank's pieces (its load hook, ``:28``); the file lists
    ``w2``, ``w1``, ``w3`` (the save hook, ``:34-40``) and every other module in registration order."""
    out = {}
    for key, value in model.items():
        if ".feed_forward." not in key:
            out[key] = value
        elif key.endswith(".w2.weight"):
            assert list(model)[list(model).index(key) + 1:][:2] == [key.replace(".w2.", ".w1."),
                                                                   key.replace(".w2.", ".w3.")]
            w1, w3 = model[key.replace(".w2.", ".w1.")], model[key.replace(".w2.", ".w3.")]
            out[key.replace(".w2.", ".fused_w1_w3.")] = torch.cat([w1, w3], dim=0)
            out[key] = value
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_mlp_layer_fusion_run_goes_back_and_forth_bit_for_bit(round_trips, tmp_path, tp):
    """An InternLM2 run handed back as an ``mlp_layer_fusion=True`` InternEvo run at tp ``tp`` × ZeRO 2: each
    plan is the rule over the fused parameters and each fp32 partition those parameters (fp32 run: the
    masters are the weights); read back, the same state per tensor as the unfused run; and those fused files →
    the adapter's form → InternEvo's form again come back byte for byte. (InternEvo's own fused files:
    ``test_internevo_mlp_layer_fusion_checkpoint_is_read_and_written_back``.)"""
    cfg, ours, _ = round_trips[(ZERO2, 4)]
    fused_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mlp_layer_fusion=True))
    back = HandBack.prepare(ours, target_layout(cfg.model, tp, 1, 1), zero1=2)
    assert not back.settings.mlp_layer_fusion
    back = dataclasses.replace(back, settings=RunSettings.from_config(fused_cfg))
    folder = back.write(tmp_path / "fused")
    for t in range(tp):
        params = fused_parameters(torch.load(folder / f"model_tp{t}_pp0.pt", weights_only=True))
        assert sum(".fused_w1_w3." in k for k in params) == 2
        plan, keys = plan_by_rule({k: v.shape for k, v in params.items()}, 2)
        for z in range(2):
            written = load_internevo(folder / f"optimizer_tp{t}_pp0_zo{z}.pt")
            assert written["zero_devide_optim_plan"] == [plan, [[], []]]
            assert_flat_is_model(written["flat_fp32_weights"][0], keys[z], params, f"tp{t} zo{z}")
    assert load_internevo(folder / "model_config.pt")["mlp_layer_fusion"] is True
    assert read_state(folder).info["optimizer"]["mlp_layer_fusion"] is True  # what inspect reports
    import_optimizer(folder, cfg.model, tmp_path / "again")  # the plan says fused, whatever the config says
    for kind in ("fp32", "exp_avg", "exp_avg_sq"):
        a = open_checkpoint(tmp_path / "again" / "optimizer" / kind, cfg.model)
        b = open_checkpoint(ours / "optimizer" / kind, cfg.model)
        assert_same(dict(a.tensors), dict(b.tensors), kind)
    mine = import_checkpoint(folder, fused_cfg, tmp_path / "ours")
    again = HandBack.prepare(mine, target_layout(cfg.model, tp, 1, 1), zero1=2).write(tmp_path / "again_back")
    for path in folder.iterdir():
        if path.name.startswith(("optimizer_", "gpus-")):
            assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    state = load_internevo(folder / "optimizer_tp0_pp0_zo0.pt")  # a plan of neither parameter list
    state["zero_devide_optim_plan"][0][0].pop()
    save(state, folder / "optimizer_tp0_pp0_zo0.pt")
    with pytest.raises(CheckpointError, match=r"optimizer_tp0_pp0_zo0\.pt: the plan lists \d+ parameters; the "
                                              r"model file's tensors make \d+ \(\d+ with InternEvo's mlp_layer_fusion"):
        import_optimizer(folder, cfg.model, tmp_path / "bad")


def read_in_and_back(fixture: Path, tmp_path: Path, tp: int, pp: int, vpp: int) -> None:
    """A model and optimizer checkpoint InternEvo wrote (``ckpt/``, a run over two ZeRO ranks) read into the
    adapter's form: every fp32 master cast to the model's dtype is the model file's tensor (InternEvo copies
    the masters into the weights after each step), so each partition was cut into the right parameters; handed
    back at its own layout: the model files, the plans, every flat tensor, the loss scale and the groups'
    settings but the lr (its scheduler was not stepped) are InternEvo's, bit for bit, the plan files byte for
    byte."""
    cfg, _ = read_config(fixture / "config.py")
    ckpt = fixture / "ckpt"
    ours = _our_checkpoint(tmp_path / "ours", cfg)  # the small files of a 2-rank run; the state replaced below
    (ours / "model_tp0_pp0.pt").unlink()
    models = sorted(ckpt.glob("model_tp*_pp*.pt"))
    assert len(models) == tp * pp
    for path in models:
        shutil.copyfile(path, ours / path.name)
    context = torch.load(ours / "context.pt", weights_only=True)
    context["grad_scaler"] = import_optimizer(ckpt, cfg.model, ours)
    torch.save(context, ours / "context.pt")
    for path in models:
        model = dict(torch.load(path, weights_only=True))
        states = {kind: torch.load(ours / "optimizer" / kind / path.name, weights_only=True)
                  for kind in ("fp32", "exp_avg", "exp_avg_sq")}
        assert {v.dtype for v in states["fp32"].values()} == {torch.float32}
        assert_same({k: v.to(model[k].dtype) for k, v in states["fp32"].items()}, model, f"masters of {path.name}")
        assert all(bool((v > 0).all()) for v in states["exp_avg_sq"].values())  # every element has moments
    back = HandBack.prepare(ours, target_layout(cfg.model, tp, pp, vpp), zero1=2).write(tmp_path / "back")
    for path in models:
        assert_same(dict(torch.load(back / path.name, weights_only=True)), dict(torch.load(path, weights_only=True)),
                    path.name)
    optimizer_files = sorted(ckpt.glob("optimizer_*.pt"))
    assert len(optimizer_files) == 2 * tp * pp
    for path in optimizer_files:
        mine, theirs = load_internevo(back / path.name), load_internevo(path)
        assert mine["zero_devide_optim_plan"] == theirs["zero_devide_optim_plan"], path.name
        assert_same(mine["flat_fp32_weights"], theirs["flat_fp32_weights"], path.name)
        assert_same(mine["base_optim_states"]["state"], theirs["base_optim_states"]["state"], path.name)
        assert mine["grad_scaler"] == theirs["grad_scaler"], path.name
        for a, b in zip(*(f["base_optim_states"]["param_groups"] for f in (mine, theirs)), strict=True):
            assert {k: v for k, v in a.items() if k != "lr"} == {k: v for k, v in b.items() if k != "lr"}, path.name
    for path in ckpt.glob("gpus-*"):
        assert (back / path.name).read_bytes() == path.read_bytes(), path.name


def test_internevo_mlp_layer_fusion_checkpoint_is_read_and_written_back(tmp_path):
    """InternEvo's own ``mlp_layer_fusion`` run at tensor 2 × ZeRO 2 (fixture ``internlm2_fused_tp2_zero2``): its
    files hold each MLP as ``w2``, ``w1``, ``w3`` (the save hook) and its plans number each tensor rank's fused
    ``[w1; w3]`` parameter."""
    fused = FIXTURES / "internlm2_fused_tp2_zero2"
    for t in range(2):
        model = torch.load(fused / "ckpt" / f"model_tp{t}_pp0.pt", weights_only=True)
        assert [k.split(".")[-2] for k in model if ".feed_forward." in k][:3] == ["w2", "w1", "w3"]
        plan = torch.load(next((fused / "ckpt").glob(f"gpus-*_tp-{t}_*")), weights_only=True)
        assert sum(len(ids) for ids in plan[0]) == len(model) - 2  # one parameter per MLP fewer than tensors
    read_in_and_back(fused, tmp_path, 2, 1, 1)


def test_internevo_tp2_pp2_chunked_checkpoint_is_read_and_written_back(tmp_path):
    """InternEvo's own InternLM1 run at tensor 2 × pipeline 2 × 2 chunks × ZeRO 2 (fixture
    ``internlm1_tp2_pp2_zero2``): each (tensor, pipeline) rank partitions its own parameters, chunk 0's before
    chunk 1's, the row-parallel ``out_proj.bias`` only on tensor rank 0. (Its sizes leave no tie that the
    ``Wqkv``-before-``out_proj`` order would decide; ``test_internlm1_parameter_order_follows_internevo_source``
    holds that order.)"""
    read_in_and_back(FIXTURES / "internlm1_tp2_pp2_zero2", tmp_path, 2, 2, 2)


def test_internevo_bf16_tp2_checkpoint_is_read_and_written_back(tmp_path):
    """InternEvo's own bf16 InternLM2 run at tensor 2 × ZeRO 2 (fixture ``internlm2_bf16_tp2_zero2``): bf16
    weights over fp32 masters, GQA's ``wqkv`` split per tensor rank, the ``default`` group's dtype bf16 and the
    dynamic loss scale InternEvo keeps in bf16 too."""
    read_in_and_back(FIXTURES / "internlm2_bf16_tp2_zero2", tmp_path, 2, 1, 1)


# ---- what InternEvo's reader refuses, and the sampler's next epoch


def test_filled_group_other_than_default_is_refused_naming_file_and_group(tmp_path, round_trips):
    cfg, _, back = round_trips[(DP1, 4)]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for path in back.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    state = load_internevo(folder / "optimizer_tp0_pp0_zo0.pt")
    state["zero_devide_optim_plan"][1][0].append(state["zero_devide_optim_plan"][0][0].pop())
    save(state, folder / "optimizer_tp0_pp0_zo0.pt")
    with pytest.raises(CheckpointError) as err:
        import_optimizer(folder, cfg.model, tmp_path / "out")
    assert str(err.value).startswith(f"{folder / 'optimizer_tp0_pp0_zo0.pt'}: optimizer group 'fp32' holds")
    assert "\n" not in str(err.value)


def test_resumed_internevo_sampler_starts_the_next_epoch_as_internevo(tmp_path):
    """InternEvo's ``rng_state`` is the generator before the epoch's shuffle: a resumed sampler must shuffle
    the next epoch from where that shuffle left it, as the uninterrupted run does (9 steps an epoch here)."""
    from adapter.data.sampler import BatchSampler

    state = sampler_state(ZERO2 / "ckpt" / "4" / "sampler.pt")
    for rank in range(2):
        resumed = BatchSampler(37, 2, None, 2468, rank, 2, state=dict(state))
        whole = BatchSampler(37, 2, None, 2468, rank, 2)
        whole_batches = [b for _, b in zip(range(24), whole)][4:]
        assert [b for _, b in zip(range(20), resumed)] == whole_batches


# ---- the command line


def _cli(*args: str) -> int:
    from adapter.cli.ckpt import main

    return main([str(a) for a in args])


def test_convert_hands_a_training_checkpoint_back(round_trips, tmp_path, capsys):
    cfg, ours, _ = round_trips[(ZERO2, 4)]
    assert _cli("convert", ours, tmp_path / "dry", "--to", "internevo", "--dry-run") == 0
    planned = [line.split("/")[-1] for line in capsys.readouterr().out.splitlines()[1:]]
    assert _cli("convert", ours, tmp_path / "back", "--to", "internevo") == 0  # ZeRO 2 from the run's config
    assert sorted(planned) == sorted(p.name for p in (tmp_path / "back").iterdir() if not p.name.startswith("."))
    for name in ("optimizer_tp0_pp0_zo1.pt", "sampler.pt", "schedulder.pt"):
        assert (tmp_path / "back" / name).read_bytes() == (ZERO2 / "ckpt" / "4" / name).read_bytes()
    assert _cli("convert", ours, tmp_path / "one", "--to", "internevo", "--zero1", "1") == 0
    assert sorted(p.name for p in (tmp_path / "one").glob("optimizer_*")) == ["optimizer_tp0_pp0_zo0.pt"]


def test_hand_back_at_another_data_parallel_size_regroups_the_sampler(round_trips, tmp_path, capsys):
    """ZERO2's ``ckpt/4`` (2 data-parallel ranks × micro_num 2) handed back for one rank: InternEvo's own
    sampler and counters at that step as that run would hold them on one rank with the global batch kept
    (rank r reads ``indices[r::dp]`` of each global batch, ``INTERNEVO_FORMAT.md`` §6.6; its sampler and
    ``TrainState`` count one rank's rows): ``batch_size`` 4, ``data_world_size`` 1, twice the rows consumed,
    everything else InternEvo's bytes. (That it resumes InternEvo's run exactly: the trajectory tests.)"""
    cfg, ours, _ = round_trips[(ZERO2, 4)]
    assert _cli("convert", ours, tmp_path / "back", "--to", "internevo", "--dp", "1", "--zero1", "1") == 0
    theirs = load_internevo(ZERO2 / "ckpt" / "4" / "sampler.pt")
    assert (theirs["data_world_size"], theirs["batch_size"]) == (2, 2)
    expected = {**theirs, "data_world_size": 1, "batch_size": 4,
                "num_consumed_samples_in_epoch": 2 * theirs["num_consumed_samples_in_epoch"]}
    assert_same(load_internevo(tmp_path / "back" / "sampler.pt"), expected, "sampler")
    context = load_internevo(ZERO2 / "ckpt" / "4" / "context.pt")
    expected = {**context, "num_consumed_samples_in_epoch": 2 * context["num_consumed_samples_in_epoch"]}
    assert_same(load_internevo(tmp_path / "back" / "context.pt"), expected, "context")
    assert [p.name for p in (tmp_path / "back").glob("gpus-*")] == ["gpus-1_wp-0_tp-0_dp-0_pp-0_zo-0.pt"]
    capsys.readouterr()
    # a global batch of 4 rows does not split over 3 ranks; the old ZeRO size 2 does not divide 1 rank
    for flags, message in ((("--dp", "3"), "global batch of 4 rows (2 per rank × 2 ranks) does not split over 3"),
                           (("--dp", "1"), "ZeRO-1 size 2 does not divide the run's data-parallel size 1"),
                           (("--dp", "1", "--state", "adapter"), "resumes at any data-parallel size")):
        assert _cli("convert", ours, tmp_path / "no", "--to", "internevo", *flags) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "no").exists()
    ramping = dataclasses.replace(RunSettings.from_dict(torch.load(ours / "schedulder.pt")["internevo"]),
                                  rampup="1 1 2")
    with pytest.raises(CheckpointError, match="ramps its batch up"):
        HandBack.prepare(ours, target_layout(cfg.model, 1, 1, 1), zero1=1, settings=ramping, dp=1)


def test_convert_refuses_bad_zero_sizes_and_missing_settings_writing_nothing(round_trips, tmp_path, capsys):
    cfg, ours, _ = round_trips[(ZERO2, 4)]
    assert _cli("convert", ours, tmp_path / "a", "--to", "internevo", "--zero1", "3") == 2
    assert "ZeRO-1 size 3 does not divide the run's data-parallel size 2" in capsys.readouterr().err
    config = ZERO2 / "config.py"
    assert _cli("convert", ZERO2 / "init", tmp_path / "b", "--to", "internevo", "--zero1", "2", "--config", config) == 2
    assert _cli("convert", ZERO2 / "init", tmp_path / "c", "--to", "internevo", "--config", config) == 0  # weights
    assert not list((tmp_path / "c").glob("optimizer_*")) and (tmp_path / "c" / "model_tp0_pp0.pt").exists()
    old = tmp_path / "old"
    old.mkdir()
    for path in ours.rglob("*"):
        if path.is_file():
            (old / path.relative_to(ours)).parent.mkdir(parents=True, exist_ok=True)
            (old / path.relative_to(ours)).write_bytes(path.read_bytes())
    torch.save({"step_count": 4, "base_lr": 0.008}, old / "schedulder.pt")  # written before hand-back support
    capsys.readouterr()
    assert _cli("convert", old, tmp_path / "d", "--to", "internevo") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{old / 'schedulder.pt'}: does not record" in err and "--config" in err
    assert _cli("convert", old, tmp_path / "e", "--to", "internevo", "--config", config) == 0
    sampler = torch.load(old / "sampler.pt", weights_only=True)
    del sampler["num_samples"]  # a state that cannot name its epoch's rows: refused before anything is written
    torch.save(sampler, old / "sampler.pt")
    assert _cli("convert", old, tmp_path / "f", "--to", "internevo", "--config", config) == 1
    assert f"{old / 'sampler.pt'}: no 'num_samples'" in capsys.readouterr().err
    shutil.copyfile(ours / "sampler.pt", old / "sampler.pt")
    (old / "optimizer" / "exp_avg_sq" / "model_tp0_pp0.pt").unlink()  # found after the model files are written
    assert _cli("convert", old, tmp_path / "h", "--to", "internevo", "--config", config) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exp_avg_sq" in err
    assert not [p for p in tmp_path.iterdir() if p.name in ("a", "b", "d", "f", "h") or p.name.startswith(".")]
