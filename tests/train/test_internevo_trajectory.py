"""Training against InternEvo 0.5.2's own 8-step runs (``tests/fixtures/internevo/internlm2_traj_*``).

The adapter trains each fixture's config from its ``init/`` weights through the real training loop and must
reproduce what InternEvo recorded: the per-step loss, lr and gradient norm (``trajectory.json``, 1e-5
relative) and the step-8 weights (InternEvo's ``ckpt/8``, 1e-4 relative per tensor). The model is initialised
from another seed than InternEvo's, so a run that does not really start from ``init/`` cannot pass, nor one
that clips in fp32 (InternEvo does not: every step's norm is above ``clip_grad_norm=1.0``).

Then every way weights enter a run is held against a single-process ``torch.optim.AdamW`` step from those
weights (no DeepSpeed): ``load_model_only_folder``, ``load_ckpt_info`` with ``content=("model",)``, a full
checkpoint with ``load_optimizer=False``, and an HF folder, at tp1 and pp2 × vpp2, fp32 and bf16.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import FIXTURES
from tests.spawn import spawn
from tests.train import fixture_runs

DP1, ZERO2 = FIXTURES / "internlm2_traj_dp1", FIXTURES / "internlm2_traj_zero2"
FOUR_LAYERS = {"NUM_LAYER = 2": "NUM_LAYER = 4"}


def trajectory(fixture: Path) -> list[dict]:
    return json.loads((fixture / "trajectory.json").read_text())["steps"]


def write_config(fixture: Path, path: Path, run: Path, ckpt: str, **edits: str) -> Path:
    """The fixture's own config file with its relative paths made absolute, checkpoints saved under ``run``,
    ``ckpt`` (config lines) where InternEvo's ``load_ckpt_info=None`` was, and literal ``edits`` (old → new)."""
    text = (fixture / "config.py").read_text()
    replace = {'train_folder="data"': f'train_folder="{fixture / "data"}"',
               'save_ckpt_folder="local:ckpt"': f'save_ckpt_folder="local:{run / "ckpt"}"',
               "load_ckpt_info=None,": ckpt, **edits}
    for old, new in replace.items():
        assert text.count(old) == 1, f"{fixture / 'config.py'} no longer has exactly one {old!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def model_only(folder: Path) -> str:
    return f'load_model_only_folder="local:{folder}",'


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def logical(folder: Path, config: Path) -> dict[str, torch.Tensor]:
    from adapter.checkpoint.convert import open_checkpoint
    from adapter.config import read_config

    cfg, _ = read_config(config)
    return dict(open_checkpoint(folder, cfg.model).tensors)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``, the issue's per-tensor measure."""
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_matches_internevo(run: Path, fixture: Path, config: Path) -> dict[str, float]:
    """Loss, lr and grad norm of every step (1e-5 relative) and the step-8 weights (1e-4 per tensor)."""
    got, want = metrics(run), trajectory(fixture)
    assert [r["step"] for r in got] == [w["step"] for w in want] == list(range(1, 9))
    worst = {"loss": 0.0, "lr": 0.0, "grad_norm": 0.0, "weights": 0.0}
    for r, w in zip(got, want):
        for key in ("loss", "lr", "grad_norm"):
            err = abs(r[key] - w[key]) / abs(w[key])
            assert err <= 1e-5, f"step {w['step']} {key}: {r[key]!r} vs InternEvo's {w[key]!r}"
            worst[key] = max(worst[key], err)
    ours, theirs = logical(run / "ckpt" / "8", config), logical(fixture / "ckpt" / "8", config)
    assert ours.keys() == theirs.keys()
    for name, w in theirs.items():
        worst["weights"] = max(worst["weights"], rel(ours[name], w))
        assert rel(ours[name], w) <= 1e-4, name
    for step in (4, 8):  # the counters of InternEvo's TrainState, as its context.pt holds them
        ours, theirs = (torch.load(f / "ckpt" / str(step) / "context.pt", weights_only=True) for f in (run, fixture))
        assert {k: ours[k] for k in theirs if k != "tensorboard_folder"} == \
            {k: v for k, v in theirs.items() if k != "tensorboard_folder"}, f"context.pt at step {step}"
    print(f"{run.name} vs InternEvo, worst relative errors: {worst}")  # the README's parity figures (pytest -s)
    return worst


def assert_continues_internevo(run: Path, fixture: Path, config: Path) -> None:
    """Steps 5-8 after resuming InternEvo's own ``ckpt/4`` (its optimizer, sampler and counters): loss, lr and
    grad norm (1e-5 relative) as InternEvo's uninterrupted run, which its own resume reproduced exactly, and the
    step-8 weights as its ``ckpt/8`` (1e-4 per tensor)."""
    got, want = metrics(run), trajectory(fixture)[4:]
    assert [r["step"] for r in got] == [w["step"] for w in want] == [5, 6, 7, 8]
    for r, w in zip(got, want):
        for key in ("loss", "lr", "grad_norm"):
            assert abs(r[key] - w[key]) / abs(w[key]) <= 1e-5, f"step {w['step']} {key}: {r[key]!r} vs {w[key]!r}"
    ours, theirs = logical(run / "ckpt" / "8", config), logical(fixture / "ckpt" / "8", config)
    assert all(rel(ours[name], w) <= 1e-4 for name, w in theirs.items())


def resume_internevo(fixture: Path) -> str:
    return f'load_ckpt_info=dict(path="local:{fixture / "ckpt" / "4"}", content=("all",), ckpt_type="internevo"),'


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Random 4-layer weights (not the model's own init) as an InternEvo folder, and as a dict."""
    from adapter.checkpoint.convert import target_layout
    from adapter.checkpoint.formats.internevo import shard_state_dict
    from adapter.config import read_config
    from tests.model.workers import random_logical

    root = tmp_path_factory.mktemp("weights")
    config = write_config(DP1, root / "cfg.py", root, "load_ckpt_info=None,", **FOUR_LAYERS)
    model = read_config(config)[0].model
    weights = {k: v * 0.5 for k, v in random_logical(model, seed=11).items()}
    folder = root / "w"
    folder.mkdir()
    torch.save(shard_state_dict(weights, model, target_layout(model, 1, 1, 1), 0, 0), folder / "model_tp0_pp0.pt")
    return folder, weights


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, random_weights):
    """All single-process runs in one spawned process, then the AdamW references (some read those runs)."""
    from adapter.checkpoint.convert import open_checkpoint, write_checkpoint
    from adapter.cli.ckpt import main as ckpt_main
    from adapter.config import read_config

    root = tmp_path_factory.mktemp("one")
    folder, weights = random_weights
    cfg, _ = read_config(DP1 / "config.py")
    hf = write_checkpoint(open_checkpoint(DP1 / "init", cfg.model), "hf", root / "init_hf", None)
    every_step = {"checkpoint_every=4": "checkpoint_every=1"}
    c = {}
    c["dp1"] = write_config(DP1, root / "dp1.py", root / "dp1", model_only(DP1 / "init"))
    c["dp1_hf"] = write_config(DP1, root / "dp1_hf.py", root / "dp1_hf", model_only(hf))
    c["model_only"] = write_config(DP1, root / "mo.py", root / "model_only", model_only(folder), **FOUR_LAYERS,
                                   **every_step)
    c["info_model"] = write_config(
        DP1, root / "info.py", root / "info_model",
        f'load_ckpt_info=dict(path="local:{folder}", content=("model",), ckpt_type="internevo"),', **FOUR_LAYERS,
        **every_step)
    c["bf16"] = write_config(DP1, root / "bf16.py", root / "bf16", model_only(folder), **FOUR_LAYERS, **every_step,
                             **{'dtype="torch.float32"': 'dtype="torch.bfloat16"'})
    c["fresh_optimizer"] = write_config(
        DP1, root / "fresh.py", root / "fresh_optimizer",
        f'load_ckpt_info=dict(path="local:{root / "dp1" / "ckpt" / "4"}", content=("all",)), load_optimizer=False,',
        **every_step)
    c["resume_dp1"] = write_config(DP1, root / "resume.py", root / "resume_dp1", resume_internevo(DP1))
    # InternEvo's data parallel 2 run on one process, the global batch kept (2 rows × 2 ranks → 4 rows)
    on_one = {"\n    micro_num=2,": "\n    micro_num=4,", "zero1=dict(size=2": "zero1=dict(size=1"}
    c["resume_zero2_dp1"] = write_config(ZERO2, root / "rz1.py", root / "resume_zero2_dp1", resume_internevo(ZERO2),
                                         **on_one)
    # ... and that run's ckpt/4 as ``internlm-ckpt`` converts it to the adapter's form at tp2 × pp2 (every file
    # of every state cut for that layout), which this one-process run reshards again as it loads it
    converted = root / "zero2_ours_tp2_pp2"
    assert ckpt_main(["convert", str(ZERO2 / "ckpt" / "4"), str(converted), "--to", "internevo", "--tp", "2",
                      "--pp", "2", "--state", "adapter"]) == 0
    c["converted_zero2_dp1"] = write_config(
        ZERO2, root / "cz1.py", root / "converted_zero2_dp1",
        f'load_ckpt_info=dict(path="local:{converted}", content=("all",)),',
        **on_one)
    # ... and that conversion handed back to InternEvo's own form for one data-parallel rank (``--dp 1``: the
    # sampler regrouped, the global batch kept), which this run resumes as InternEvo's checkpoint
    handed = root / "zero2_handed_back_dp1"
    assert ckpt_main(["convert", str(converted), str(handed), "--to", "internevo", "--tp", "1", "--pp", "1",
                      "--dp", "1", "--zero1", "1", "--config", str(ZERO2 / "config.py")]) == 0
    c["handed_back_zero2_dp1"] = write_config(
        ZERO2, root / "hb1.py", root / "handed_back_zero2_dp1",
        f'load_ckpt_info=dict(path="local:{handed}", content=("all",), ckpt_type="internevo"),', **on_one)
    runs = [(str(c["dp1"]), str(root / "dp1"), None), (str(c["dp1_hf"]), str(root / "dp1_hf"), None),
            (str(c["resume_dp1"]), str(root / "resume_dp1"), None),
            (str(c["resume_zero2_dp1"]), str(root / "resume_zero2_dp1"), None),
            (str(c["converted_zero2_dp1"]), str(root / "converted_zero2_dp1"), None),
            (str(c["handed_back_zero2_dp1"]), str(root / "handed_back_zero2_dp1"), None)]
    runs += [(str(c[n]), str(root / n), 1) for n in ("model_only", "info_model", "bf16")]
    runs.append((str(c["fresh_optimizer"]), str(root / "fresh_optimizer"), 5))
    batches, steps = torch.load(DP1 / "batches.pt", weights_only=True), trajectory(DP1)
    refs = [(str(c["model_only"]), weights, batches[0], steps[0]["lr"]),
            (str(c["bf16"]), weights, batches[0], steps[0]["lr"]),
            (str(c["dp1"]), str(root / "dp1" / "ckpt" / "4"), batches[4], steps[4]["lr"])]
    out = spawn(fixture_runs.single_process_suite, 1, runs, refs)[0]
    return {"root": root, "configs": c, "weights": weights, "batch0": batches[0],
            "ref": dict(zip(("step1", "step1_bf16", "step5_fresh"), out))}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, random_weights):
    from adapter.cli.ckpt import main as ckpt_main

    root = tmp_path_factory.mktemp("two")
    folder, _ = random_weights
    c = {
        "dp1_pp2": write_config(DP1, root / "pp2.py", root / "dp1_pp2", model_only(DP1 / "init"),
                                **{"pipeline=dict(size=1": "pipeline=dict(size=2"}),
        "zero2": write_config(ZERO2, root / "zero2.py", root / "zero2", model_only(ZERO2 / "init")),
        "resume_zero2": write_config(ZERO2, root / "rz.py", root / "resume_zero2", resume_internevo(ZERO2)),
        "resume_dp1_pp2": write_config(DP1, root / "rpp.py", root / "resume_dp1_pp2", resume_internevo(DP1),
                                       **{"pipeline=dict(size=1": "pipeline=dict(size=2"}),
        "pp2_vpp2": write_config(DP1, root / "vpp.py", root / "pp2_vpp2", model_only(folder), **FOUR_LAYERS,
                                 **{"pipeline=dict(size=1": "pipeline=dict(size=2", "num_chunks=1": "num_chunks=2",
                                    "checkpoint_every=4": "checkpoint_every=1"}),
    }
    runs = [(str(c["dp1_pp2"]), str(root / "dp1_pp2"), None), (str(c["zero2"]), str(root / "zero2"), None),
            (str(c["pp2_vpp2"]), str(root / "pp2_vpp2"), 1), (str(c["resume_zero2"]), str(root / "resume_zero2"), None),
            (str(c["resume_dp1_pp2"]), str(root / "resume_dp1_pp2"), None)]
    # last: InternEvo's checkpoint with one optimizer file cut short (converted once per node, by rank 0)
    damaged = root / "damaged_ckpt"
    shutil.copytree(ZERO2 / "ckpt" / "4", damaged)
    cut = damaged / "optimizer_tp0_pp0_zo1.pt"
    cut.write_bytes(cut.read_bytes()[:1000])
    c["damaged"] = write_config(ZERO2, root / "damaged.py", root / "damaged",
                                f'load_ckpt_info=dict(path="local:{damaged}", content=("all",), ckpt_type="internevo"),')
    # and an adapter checkpoint (InternEvo's ckpt/4 converted) whose second optimizer folder holds a stray
    # tensor: that folder (one stage) is checked by rank 1 alone (train.open_shared), and rank 0 must stop too
    stray = root / "stray_ckpt"
    assert ckpt_main(["convert", str(ZERO2 / "ckpt" / "4"), str(stray), "--to", "internevo", "--state", "adapter"]) == 0
    exp_avg = stray / "optimizer" / "exp_avg" / "model_tp0_pp0.pt"
    torch.save({**torch.load(exp_avg, weights_only=True), "layers.0.attention.stray.weight": torch.zeros(2)}, exp_avg)
    c["stray"] = write_config(ZERO2, root / "stray.py", root / "stray",
                              f'load_ckpt_info=dict(path="local:{stray}", content=("all",)),')
    # and InternEvo's checkpoint with its optimizer files named as a weight-parallel (isp) run names them
    isp = root / "isp_ckpt"
    shutil.copytree(ZERO2 / "ckpt" / "4", isp)
    for z in range(2):
        (isp / f"optimizer_tp0_pp0_zo{z}.pt").rename(isp / f"optimizer_tp0_wp0_pp0_dp{z}.pt")
    c["isp"] = write_config(ZERO2, root / "isp.py", root / "isp",
                            f'load_ckpt_info=dict(path="local:{isp}", content=("all",), ckpt_type="internevo"),')
    c["isp_fresh"] = write_config(ZERO2, root / "ispf.py", root / "isp_fresh",
                                  f'load_ckpt_info=dict(path="local:{isp}", content=("all",), ckpt_type="internevo"), '
                                  'load_optimizer=False,')
    runs.append((str(c["isp_fresh"]), str(root / "isp_fresh"), None))
    failing = [(str(c["damaged"]), str(root / "damaged")), (str(c["stray"]), str(root / "stray")),
               (str(c["isp"]), str(root / "isp"))]
    errors = spawn(fixture_runs.train_runs, 2, runs, failing)
    return {"root": root, "configs": c, "damaged_errors": [e[0] for e in errors],
            "stray_errors": [e[1] for e in errors], "isp_errors": [e[2] for e in errors]}


# ---- InternEvo's own trajectories


@pytest.mark.multiproc
def test_dp1_reproduces_internevo_trajectory(one_process):
    root, c = one_process["root"], one_process["configs"]
    assert_matches_internevo(root / "dp1", DP1, c["dp1"])


@pytest.mark.multiproc
def test_damaged_internevo_optimizer_file_stops_every_rank_naming_it(two_processes):
    """Rank 0 converts InternEvo's optimizer files for its node and fails on the cut file; rank 1, which
    waits for that conversion, stops too (no hang), quoting the same file."""
    rank0, rank1 = two_processes["damaged_errors"]
    assert "optimizer_tp0_pp0_zo1.pt" in rank0 and "cannot resume" in rank0
    assert "rank 0 could not convert it" in rank1 and "optimizer_tp0_pp0_zo1.pt" in rank1


@pytest.mark.multiproc
def test_broken_optimizer_folder_stops_every_rank_naming_it(two_processes):
    """Each stage of each optimizer folder is checked by one rank; the other stops with the same line, before
    loading."""
    for error in two_processes["stray_errors"]:
        assert "cannot resume" in error and "exp_avg/model_tp0_pp0.pt" in error, error
        assert "unexpected tensor layers.0.attention.stray.weight" in error, error


@pytest.mark.multiproc
def test_optimizer_files_not_read_here_stop_the_resume_naming_one(two_processes):
    """A full resume of a folder whose optimizer state this adapter does not read (a weight-parallel run's
    files) stops on every rank, naming a file and the way to keep its weights, instead of starting Adam
    afresh while the counters go on."""
    for error in two_processes["isp_errors"]:
        assert "isp_ckpt/optimizer_tp0_wp0_pp0_dp0.pt" in error and "ckpt.load_optimizer=False" in error, error
    # as it says: its weights, counters and InternEvo's sampler, Adam afresh; step 5's loss is InternEvo's (the
    # step-4 weights on InternEvo's step-5 batches, before any update)
    got, want = metrics(two_processes["root"] / "isp_fresh"), trajectory(ZERO2)[4]
    assert [r["step"] for r in got] == [5, 6, 7, 8]
    assert abs(got[0]["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), (got[0]["loss"], want["loss"])


@pytest.mark.multiproc
def test_dp1_at_pipeline_2_reproduces_internevo_trajectory(two_processes):
    root, c = two_processes["root"], two_processes["configs"]
    assert sorted(p.name for p in (root / "dp1_pp2" / "ckpt" / "8").glob("model_tp*.pt")) == [
        "model_tp0_pp0.pt", "model_tp0_pp1.pt"]
    assert_matches_internevo(root / "dp1_pp2", DP1, c["dp1_pp2"])


@pytest.mark.multiproc
def test_zero2_at_data_parallel_2_reproduces_internevo_trajectory(two_processes):
    """The loss compared is the mean over both ranks (``trajectory.json``'s ``loss``), which is what the
    averaged gradient belongs to; InternEvo prints rank 0's."""
    root, c = two_processes["root"], two_processes["configs"]
    assert_matches_internevo(root / "zero2", ZERO2, c["zero2"])


@pytest.mark.multiproc
@pytest.mark.parametrize("run", ["resume_dp1", "resume_zero2", "resume_dp1_pp2", "resume_zero2_dp1",
                                 "converted_zero2_dp1", "handed_back_zero2_dp1"])
def test_resuming_internevo_checkpoint_continues_its_run(one_process, two_processes, run):
    """InternEvo's full ``ckpt/4`` (``load_ckpt_info`` with ``content=("all",)``): at its own layout (one
    process; ZeRO over 2 data-parallel ranks), at pipeline 2, and the 2-rank run on one process with its global
    batch kept: the next four steps are InternEvo's. So are they from that ``ckpt/4`` converted by
    ``internlm-ckpt`` into the adapter's form at tp2 × pp2 (optimizer, sampler, grad scaler, counters), and
    from that handed back to InternEvo's form for one data-parallel rank (``--dp 1``)."""
    fixture = ZERO2 if "zero2" in run else DP1
    where = two_processes if run in two_processes["configs"] else one_process
    assert_continues_internevo(where["root"] / run, fixture, where["configs"][run])


@pytest.mark.multiproc
@pytest.mark.parametrize("run, fixture", [("dp1", DP1), ("zero2", ZERO2)])
@pytest.mark.parametrize("step", [4, 8])
def test_run_trained_here_hands_back_as_internevos_own_checkpoint(request, tmp_path, run, fixture, step):
    """The adapter's own checkpoints of InternEvo's runs (trained from ``init/``; one rank, and two with ZeRO
    over both), handed back (``internlm-ckpt convert --to internevo``): every training-state file InternEvo
    wrote at that step comes back byte for byte (plans, sampler, scheduler, context, marker), and its
    optimizer partitions differ only in the tensors, by float rounding (5e-5 relative per partition; 6e-6
    measured)."""
    from adapter.cli.ckpt import main
    from tests.train.test_internevo_export import load_internevo

    root = request.getfixturevalue("one_process" if run == "dp1" else "two_processes")["root"]
    assert main(["convert", str(root / run / "ckpt" / str(step)), str(tmp_path / "back"), "--to", "internevo"]) == 0
    theirs = fixture / "ckpt" / str(step)
    for path in theirs.iterdir():
        ours = tmp_path / "back" / path.name
        if path.name.startswith(("model_tp", "model_config")):
            continue
        if not path.name.startswith("optimizer_"):
            assert ours.read_bytes() == path.read_bytes(), path.name
            continue
        a, b = load_internevo(ours), load_internevo(path)
        flats = [(a["flat_fp32_weights"][0], b["flat_fp32_weights"][0])]
        flats += [(a["base_optim_states"]["state"][0][k], b["base_optim_states"]["state"][0][k])
                  for k in ("exp_avg", "exp_avg_sq")]
        worst = max(rel(x.detach(), y.detach()) for x, y in flats)
        print(f"{run} ckpt/{step} {path.name}: worst relative difference of the partitions {worst:.2g}")
        assert worst <= 5e-5, path.name
        assert a["base_optim_states"]["state"][0]["step"] == b["base_optim_states"]["state"][0]["step"] == step
        for d in (a, b):
            d.pop("flat_fp32_weights"), d["base_optim_states"].pop("state")
        assert a == b, path.name


@pytest.mark.multiproc
def test_fine_tuning_from_converted_hf_folder_reproduces_internevo(one_process):
    """``load_model_only_folder`` pointing at a Hugging Face folder (InternEvo's ``init/`` converted by
    ``internlm-ckpt``) is read on the fly and trains exactly as InternEvo did from ``init/``."""
    root, c = one_process["root"], one_process["configs"]
    assert_matches_internevo(root / "dp1_hf", DP1, c["dp1_hf"])


@pytest.mark.multiproc
def test_metrics_file_holds_every_number_at_full_precision(one_process):
    records = metrics(one_process["root"] / "dp1")
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"loss", "lr", "grad_norm", "loss_scale", "tokens", "tokens_per_s", "skipped"} <= r.keys()
        assert r["tokens"] == 2 * 64 and r["loss_scale"] == 1.0 and r["skipped"] is False
    # repr precision: a float written with 4 or 6 digits would not survive 1e-12
    assert records[3]["lr"] == pytest.approx(trajectory(DP1)[3]["lr"], rel=1e-12)


# ---- weights entering a run reach the optimizer's master copy


def _after_one_step(folder: Path, config: Path, ref: dict[str, torch.Tensor], tol: float) -> float:
    got = logical(folder, config)
    assert got.keys() == ref.keys()
    worst = max(rel(got[k].float(), ref[k]) for k in ref)
    print(f"{folder}: worst relative error vs AdamW from the loaded weights {worst:.3g}")
    assert worst <= tol, worst
    return worst


@pytest.mark.multiproc
@pytest.mark.parametrize("run", ["model_only", "info_model"])
def test_one_step_from_loaded_weights_equals_adamw_from_them(one_process, run):
    root, c, ref = one_process["root"], one_process["configs"], one_process["ref"]["step1"]
    _after_one_step(root / run / "ckpt" / "1", c[run], ref, 1e-6)


@pytest.mark.multiproc
def test_untouched_embedding_rows_only_decay(one_process):
    """Closed form, no reference model: AdamW's first step moves a row whose gradient is zero (a token absent
    from the batch) by weight decay alone, ``w * (1 - lr * weight_decay)``. The bug this guards against moved
    such rows by up to 0.1 (the optimizer's master copy was the random initialisation)."""
    root, c, weights = one_process["root"], one_process["configs"], one_process["weights"]
    got = logical(root / "model_only" / "ckpt" / "1", c["model_only"])
    name = next(k for k in weights if k.endswith("tok_embeddings.weight"))
    absent = sorted(set(range(200)) - set(one_process["batch0"]["input_ids"].flatten().tolist()))
    assert len(absent) > 50
    lr, decay = trajectory(DP1)[0]["lr"], 0.01
    expected = weights[name][absent] * (1 - lr * decay)
    assert torch.allclose(got[name][absent], expected, rtol=1e-6, atol=0)


@pytest.mark.multiproc
def test_bf16_one_step_from_loaded_weights_within_bf16_rounding(one_process):
    root, c, ref = one_process["root"], one_process["configs"], one_process["ref"]["step1_bf16"]
    _after_one_step(root / "bf16" / "ckpt" / "1", c["bf16"], ref, 1e-2)


@pytest.mark.multiproc
def test_full_resume_without_optimizer_starts_adamw_afresh_from_the_checkpoint(one_process):
    """``load_optimizer=False``: model and counters from ``ckpt/4``, a fresh AdamW state; update 5 must be a
    fresh AdamW step from ckpt/4's weights at InternEvo's step-5 lr on InternEvo's step-5 batch."""
    root, c, ref = one_process["root"], one_process["configs"], one_process["ref"]["step5_fresh"]
    assert [r["step"] for r in metrics(root / "fresh_optimizer")] == [5]
    _after_one_step(root / "fresh_optimizer" / "ckpt" / "5", c["fresh_optimizer"], ref, 1e-6)


@pytest.mark.multiproc
def test_one_step_from_loaded_weights_at_pp2_vpp2(one_process, two_processes):
    root, c = two_processes["root"], two_processes["configs"]
    _after_one_step(root / "pp2_vpp2" / "ckpt" / "1", c["pp2_vpp2"], one_process["ref"]["step1"], 1e-5)


# ---- what the lr closed form and the data pipeline are pinned to


@pytest.mark.parametrize("fixture", [DP1, ZERO2])
def test_learning_rate_closed_form_matches_internevo(fixture):
    """InternEvo 0.5.2 on the torch it was written for (<= 2.7). With torch >= 2.8 its WarmupScheduler
    inflates every cosine value above eta_min by 2 / (1 + cos(pi / T_max)): the fixtures' generator restored
    the old ``CosineAnnealingLR.get_lr`` branch, and checked the values against torch 2.7.1's scheduler."""
    from adapter.config import read_config
    from adapter.train.schedules import learning_rate

    cfg, _ = read_config(fixture / "config.py")
    for t, step in enumerate(trajectory(fixture)):
        assert learning_rate(t, cfg.adam.lr, cfg.lr_scheduler) == pytest.approx(step["lr"], rel=1e-12, abs=0)
    inflated = 0.0008 + (0.008 - 0.0008) * 2 / (1 + torch.cos(torch.tensor(torch.pi / 6)).item())
    assert trajectory(fixture)[2]["lr"] == 0.008 != pytest.approx(inflated)


@pytest.mark.parametrize("fixture, ranks", [(DP1, 1), (ZERO2, 2)])
def test_batches_equal_internevo_batches(monkeypatch, fixture, ranks):
    from adapter.config import read_config
    from adapter.data.loader import build_train_batches

    cfg, _ = read_config(fixture / "config.py")
    monkeypatch.chdir(fixture)
    expected = torch.load(fixture / "batches.pt", weights_only=True)
    for rank in range(ranks):
        _, batches = build_train_batches(cfg.data, rank, ranks)
        for step, want in enumerate(expected):
            want = want[rank] if ranks > 1 else want
            count, got = next(batches)
            assert count == step
            for key in ("input_ids", "labels", "cu_seqlens"):
                a, b = got[key], want[key]
                pairs = zip(a, b) if isinstance(b, list) else [(a, b)]
                assert all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in pairs), (step, key)


def test_config_edits_are_literal():
    """``write_config`` refuses an edit that does not hit exactly one line (a silent no-op would make a
    parity run test the wrong thing)."""
    with pytest.raises(AssertionError, match="exactly one"):
        write_config(DP1, Path("/nonexistent.py"), Path("/tmp"), "load_ckpt_info=None,", **{"no such": "x"})
