"""``internlm-ckpt`` on training checkpoints: ``inspect``'s state section, and ``convert --to internevo`` of the
whole training state, from InternEvo's own ``ckpt/4`` (``tests/fixtures/internevo/internlm2_traj_zero2``) and
from the adapter's form at another layout.

The oracles are independent of the conversion code: InternEvo's files read with plain ``torch.load`` (its fp32
run's master weights equal its model weights; its flat ZeRO partitions hold the same values as the per-parameter
states), the fixture's config (step, ZeRO size, data-parallel size), and the tensor table's cut as the trainer's
own saver applies it (``shard_state_dict``) plus slices taken by hand. That the result resumes exactly is
tested with real training in ``tests/train`` (``test_resume.py``, ``test_internevo_trajectory.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapter.cli.ckpt import main
from tests.conftest import FIXTURES, base_sections

ZERO2 = FIXTURES / "internlm2_traj_zero2" / "ckpt" / "4"
DP1 = FIXTURES / "internlm2_traj_dp1" / "ckpt" / "4"
WEIGHTS_ONLY = FIXTURES / "internlm2_tiny" / "ckpt"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
SMALL = ("context.pt", "sampler.pt", "schedulder.pt", "optimizer/state.pt")


def _run(capsys, *args) -> tuple[int, str, str]:
    """``main`` in this process: (exit status, stdout, stderr), argparse's usage errors included."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _inspect(capsys, folder: Path) -> dict:
    rc, out, err = _run(capsys, "inspect", folder)
    assert rc == 0, err
    return json.loads(out)


class _Mode:
    """InternEvo's ``ParallelMode`` enum (in its optimizer files' param groups), read as its value only."""

    def __init__(self, value: str):
        self.value = value


def _internevo_file(path: Path) -> dict:
    """One of InternEvo's optimizer files, read whole with plain ``torch.load``."""
    with torch.serialization.safe_globals([(_Mode, "internlm.core.context.process_group_initializer.ParallelMode")]):
        return torch.load(path, weights_only=True)


def _tensor_files(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.relative_to(root).as_posix(): torch.load(p, weights_only=True)
            for p in sorted(root.rglob("model_tp*_pp*.pt"))}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """InternEvo's ZeRO-2 ``ckpt/4`` in the adapter's form at tp1 pp1 (``one``), that resharded to tp2 pp2
    (``four``), and back to tp1 pp1 (``back``), each written by the CLI."""
    root = tmp_path_factory.mktemp("state")
    out = {"one": root / "one", "four": root / "four", "back": root / "back"}
    for src, dst, layout in ((ZERO2, out["one"], ()), (out["one"], out["four"], ("--tp", 2, "--pp", 2)),
                             (out["four"], out["back"], ())):
        assert main([str(a) for a in ("convert", src, dst, "--to", "internevo", "--state", "adapter", *layout)]) == 0
    return out


def test_inspect_internevo_training_checkpoints(capsys):
    """The fixture configs' truths: saved at step 4 (``checkpoint_every=4``), ZeRO over 2 or 1 data-parallel
    ranks, 2 rows per step per rank (``micro_num=2``, so the sampler is at batch 4), Adam at step 4."""
    for folder, ranks in ((ZERO2, 2), (DP1, 1)):
        info = _inspect(capsys, folder)
        assert info["format"] == "internevo" and (info["tp"], info["pp"]) == (1, 1)
        state = info["state"]
        assert state["kind"] == "internevo" and state["step"] == 4 and state["complete"] and state["problems"] == []
        opt = state["optimizer"]
        assert (opt["tp"], opt["pp"], opt["zero1"], opt["files"]) == (1, 1, ranks, ranks)
        assert opt["states"] == list(STATES) and opt["mlp_layer_fusion"] is False
        raw = _internevo_file(folder / "optimizer_tp0_pp0_zo0.pt")
        assert opt["adam_step"] == int(raw["base_optim_states"]["state"][0]["step"]) == 4
        assert state["grad_scaler"] == raw["grad_scaler"]
        sampler = state["sampler"]
        assert (sampler["batch_count"], sampler["data_world_size"], sampler["batch_size"]) == (4, ranks, 2)
        assert state["context"]["step_count"] == 4 and state["schedules"]["base_lrs"][0] == 0.008


def test_inspect_weights_only_folder(capsys):
    info = _inspect(capsys, WEIGHTS_ONLY)
    assert info["state"] == {"kind": "weights-only", "step": 2}
    assert info["family"] == "internlm2"  # what inspect said before is still there


def test_inspect_reads_headers_only(capsys, converted, monkeypatch):
    """Every file above a few KiB is memory-mapped (its tensors are never read), in both kinds of folder."""
    calls = []
    real_load = torch.load

    def spy(path, *args, **kwargs):
        calls.append((Path(path), kwargs.get("mmap", False)))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for folder in (converted["four"], ZERO2):
        _inspect(capsys, folder)
    assert any(path.name == "optimizer_tp0_pp0_zo0.pt" for path, _ in calls)
    assert any("exp_avg_sq" in path.parts for path, _ in calls)
    loaded_whole = [path for path, mmap in calls if not mmap and path.stat().st_size > 8192]
    assert loaded_whole == []


def test_inspect_our_training_checkpoint(capsys, converted):
    state = _inspect(capsys, converted["four"])["state"]
    assert state["kind"] == "adapter" and state["step"] == 4 and state["problems"] == []
    assert state["optimizer"] == {"format": "adapter", "states": list(STATES), "adam_steps": [4], "tp": 2, "pp": 2,
                                  "vpp": 1, "dtype": "float32"}
    assert state["sampler"]["data_world_size"] == 2 and state["grad_scaler"]["_scale"] == 1.0


def test_internevo_optimizer_state_lands_on_its_parameters(converted):
    """In InternEvo's fp32 run the master weights are the model weights, so each parameter's fp32 state must be
    exactly its weight; every moment value of the flat ZeRO partitions must appear once."""
    one = converted["one"]
    assert sorted(p.name for p in (one / "optimizer" / "fp32").iterdir()) == ["model_config.pt", "model_tp0_pp0.pt"]
    weights = torch.load(ZERO2 / "model_tp0_pp0.pt", weights_only=True)
    masters = torch.load(one / "optimizer" / "fp32" / "model_tp0_pp0.pt", weights_only=True)
    assert list(masters) == list(weights) and all(torch.equal(masters[k], weights[k]) for k in weights)
    flats = [_internevo_file(ZERO2 / f"optimizer_tp0_pp0_zo{z}.pt") for z in range(2)]
    for kind in ("exp_avg", "exp_avg_sq"):
        per_param = torch.load(one / "optimizer" / kind / "model_tp0_pp0.pt", weights_only=True)
        ours = torch.cat([t.reshape(-1) for t in per_param.values()]).sort().values
        theirs = torch.cat([f["base_optim_states"]["state"][0][kind] for f in flats]).sort().values
        assert torch.equal(ours, theirs)
    assert torch.load(one / "optimizer" / "state.pt", weights_only=True) == {"steps": [4]}
    assert torch.load(one / "4.step", weights_only=True) == {"step": 4}


def test_reshard_cuts_optimizer_states_like_the_weights(converted):
    """tp1 pp1 → tp2 pp2: every file of every state is the original cut by the tensor table, as the trainer's
    saver cuts it at that layout (and, by hand, a column-parallel weight's rows and the embedding's hidden
    columns); small files are carried byte for byte; back to tp1 pp1 is bit-exact."""
    from adapter.checkpoint.convert import open_checkpoint, target_layout
    from adapter.checkpoint.formats.internevo import shard_state_dict

    one, four = converted["one"], converted["four"]
    model = open_checkpoint(one).model
    layout = target_layout(model, 2, 2, 1)
    for kind in ("", *(f"optimizer/{s}" for s in STATES)):
        original = torch.load(one / kind / "model_tp0_pp0.pt", weights_only=True)  # tp1 pp1: the logical tensors
        for t in range(2):
            for p in range(2):
                got = torch.load(four / kind / f"model_tp{t}_pp{p}.pt", weights_only=True)
                want = shard_state_dict(original, model, layout, t, p)
                assert list(got) == list(want), (kind, t, p)
                assert all(torch.equal(got[k], want[k]) for k in want), (kind, t, p)
        w1, w2 = "layers.{}.feed_forward.w1.weight", "layers.{}.feed_forward.w2.weight"
        stage0_tp1 = torch.load(four / kind / "model_tp1_pp0.pt", weights_only=True)
        assert torch.equal(stage0_tp1[w1.format(0)], original[w1.format(0)][40:])  # rows of the MLP width 80
        assert torch.equal(stage0_tp1["tok_embeddings.weight"], original["tok_embeddings.weight"][:, 32:])  # hidden
        stage1_tp0 = torch.load(four / kind / "model_tp0_pp1.pt", weights_only=True)  # layer 1, numbered 0 there
        assert torch.equal(stage1_tp0[w2.format(0)], original[w2.format(1)][:, :40])
    for name in SMALL + ("4.step",):
        assert (four / name).read_bytes() == (one / name).read_bytes(), name
    back, first = _tensor_files(converted["back"]), _tensor_files(one)
    assert back.keys() == first.keys()
    for name, tensors in first.items():
        assert list(back[name]) == list(tensors) and all(torch.equal(back[name][k], v) for k, v in tensors.items())


def test_dry_run_lists_the_files_written(capsys, converted, tmp_path):
    for src, args in ((converted["one"], ("--tp", 2, "--pp", 2)), (ZERO2, ("--tp", 2))):
        rc, out, err = _run(capsys, "convert", src, tmp_path / "x", "--to", "internevo", "--state", "adapter", *args,
                            "--dry-run")
        assert rc == 0 and not (tmp_path / "x").exists(), err
        planned = {line.split()[1] for line in out.splitlines() if line.startswith("write ")}
        dst = tmp_path / src.name
        assert _run(capsys, "convert", src, dst, "--to", "internevo", "--state", "adapter", *args)[0] == 0
        written = {str(tmp_path / "x" / p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()}
        assert planned == written - {str(tmp_path / "x" / ".internlm-adapter.json")}
        skipped = [line.split("/")[-1] for line in out.splitlines() if line.startswith("skip ")]
        # InternEvo's ZeRO plans and topology files are named as not carried
        expected = [f"gpus-2_wp-0_tp-0_dp-{z}_pp-0_zo-{z}.pt" for z in range(2)] + ["topo_tp0_pp0.json"]
        assert sorted(skipped) == (expected if src == ZERO2 else [])


def _broken(tmp_path: Path, src: Path, damage) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(src, folder)
    damage(folder)
    return folder


@pytest.mark.parametrize("damage, says", [
    (lambda f: (f / "4.step").unlink(), "no {step}.step marker: the save did not finish"),
    (lambda f: (f / "sampler.pt").write_bytes(b"not a pickle"), "sampler.pt: cannot be read"),
    (lambda f: shutil.rmtree(f / "optimizer" / "exp_avg_sq"), "optimizer/exp_avg_sq: missing"),
    (lambda f: (f / "optimizer" / "state.pt").unlink(), "optimizer/state.pt: missing"),
    (lambda f: (f / "optimizer" / "exp_avg" / "model_tp1_pp1.pt").unlink(), "model_tp1_pp1.pt is missing"),
    (lambda f: torch.save({"step_count": 7}, f / "context.pt"), "context.pt: step_count 7 disagrees"),
    (lambda f: torch.save({"batch_count": 4}, f / "sampler.pt"), "sampler.pt: no consumed, epoch, seed"),
])
def test_unresumable_checkpoints_are_refused_in_one_line(capsys, converted, tmp_path, damage, says):
    folder = _broken(tmp_path, converted["four"], damage)
    rc, out, err = _run(capsys, "convert", folder, tmp_path / "out", "--to", "internevo", "--state", "adapter")
    assert rc == 1 and err.count("\n") == 1 and says in err and str(folder) in err, err
    assert not (tmp_path / "out").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert says.split(":")[0] in " ".join(_inspect(capsys, folder)["state"]["problems"])  # inspect says it too


def test_earlier_versions_deepspeed_files_need_weights_only(capsys, tmp_path):
    folder = tmp_path / "40"
    shutil.copytree(WEIGHTS_ONLY, folder)
    (folder / "deepspeed").mkdir()
    (folder / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for name in ("context.pt", "sampler.pt", "schedulder.pt"):
        shutil.copyfile(DP1 / name, folder / name)
    assert _inspect(capsys, folder)["state"]["optimizer"]["format"] == "deepspeed"
    rc, _, err = _run(capsys, "convert", folder, tmp_path / "out", "--to", "internevo", "--state", "adapter", "--tp", "2")
    assert rc == 1 and err.count("\n") == 1 and "deepspeed: DeepSpeed's own optimizer files" in err
    rc, _, err = _run(capsys, "convert", folder, tmp_path / "out", "--to", "internevo", "--tp", "2", "--weights-only")
    assert rc == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".internlm-adapter.json", "model_config.pt", "model_tp0_pp0.pt", "model_tp1_pp0.pt"]


def test_optimizer_files_not_read_here_are_named_and_refused(capsys, tmp_path):
    """InternEvo's optimizer files of a weight-parallel (isp) run: ``inspect`` names one as a problem (the folder
    has InternEvo's context and sampler, so it is not weights only), ``convert`` of the training state refuses
    in one line, and its weights still convert."""
    folder = tmp_path / "4"
    shutil.copytree(ZERO2, folder)
    for z in range(2):
        (folder / f"optimizer_tp0_pp0_zo{z}.pt").rename(folder / f"optimizer_tp0_wp0_pp0_dp{z}.pt")
    problems = _inspect(capsys, folder)["state"]["problems"]
    assert any(f"{folder / 'optimizer_tp0_wp0_pp0_dp0.pt'}: InternEvo's optimizer state" in p for p in problems)
    rc, _, err = _run(capsys, "convert", folder, tmp_path / "out", "--to", "internevo", "--state", "adapter")
    assert rc == 1 and err.count("\n") == 1 and "optimizer_tp0_wp0_pp0_dp0.pt" in err and "--weights-only" in err
    assert not (tmp_path / "out").exists()
    rc, _, err = _run(capsys, "convert", folder, tmp_path / "out", "--to", "internevo", "--weights-only")
    assert rc == 0 and (tmp_path / "out" / "model_tp0_pp0.pt").is_file(), err


def _vocab_201_training_folder(root: Path) -> Path:
    """An InternLM1 training checkpoint with a vocabulary of 201 whose state files are garbage: a refusal of
    the layout must come before any of them is read."""
    from adapter.checkpoint.convert import target_layout
    from adapter.checkpoint.formats.internevo import model_config_dict, shard_state_dict
    from adapter.config import RawConfig, normalize
    from tests.model.workers import random_logical

    s = base_sections()
    s["model"]["vocab_size"] = 201
    model = normalize(RawConfig(s, "v.py", {})).model
    folder = root / "v201"
    (folder / "optimizer" / "fp32").mkdir(parents=True)
    torch.save(shard_state_dict(random_logical(model, 3), model, target_layout(model, 1, 1, 1), 0, 0),
               folder / "model_tp0_pp0.pt")
    torch.save(model_config_dict(model), folder / "model_config.pt")
    for name in ("context.pt", "sampler.pt", "3.step", "optimizer/state.pt", "optimizer/fp32/model_tp0_pp0.pt"):
        (folder / name).write_bytes(b"garbage")
    return folder


def test_layouts_the_model_cannot_take_are_refused_before_reading(capsys, converted, tmp_path):
    """Heads (--tp 3 of 4 heads) and the vocabulary (--tp 2 of 201, which the trainer's vocab-parallel layers
    cannot split) are bad arguments, found before any state file is read (the state files here are garbage)."""
    folder = _broken(tmp_path, converted["one"], lambda f: (f / "optimizer" / "exp_avg" / "model_tp0_pp0.pt")
                     .write_bytes(b"garbage"))
    rc, _, err = _run(capsys, "convert", folder, tmp_path / "out", "--to", "internevo", "--state", "adapter", "--tp", "3")
    assert rc == 2 and err.count("\n") == 1 and "--tp 3 does not divide the attention heads (4)" in err
    vocab = _vocab_201_training_folder(tmp_path)
    rc, _, err = _run(capsys, "convert", vocab, tmp_path / "out", "--to", "internevo", "--state", "adapter", "--tp", "2")
    assert rc == 2 and err.count("\n") == 1 and "--tp 2 does not divide the vocabulary (201)" in err
    rc, _, err = _run(capsys, "convert", vocab, tmp_path / "out", "--to", "internevo", "--state", "adapter", "--tp", "2", "--dtype", "bf16")
    assert rc == 2 and "--weights-only" in err
    assert not (tmp_path / "out").exists()
    # the weights alone can take an uneven head split (InternEvo's format allows it)
    rc, _, err = _run(capsys, "convert", vocab, tmp_path / "out", "--to", "internevo", "--tp", "2", "--weights-only")
    assert rc == 0, err


def test_state_form_arguments_that_cannot_apply_are_bad_arguments(capsys, converted, tmp_path):
    """InternEvo's own training checkpoint is not handed back to InternEvo (it already is its form), and the
    adapter's form has no ZeRO partitions to size: both exit 2 before anything is written."""
    rc, _, err = _run(capsys, "convert", ZERO2, tmp_path / "out", "--to", "internevo")
    assert rc == 2 and "InternEvo's own training checkpoint already" in err and "--state adapter" in err
    rc, _, err = _run(capsys, "convert", converted["one"], tmp_path / "out", "--to", "internevo", "--state", "adapter",
                      "--zero1", "1")
    assert rc == 2 and "--zero1" in err
    assert not (tmp_path / "out").exists()


def test_internevo_state_through_the_adapters_form_and_back_is_byte_exact(capsys, tmp_path):
    """InternEvo's ckpt/4 → the adapter's form (with the run's config, which records the settings InternEvo's
    files leave out) → handed back: every training-state file InternEvo wrote comes back byte for byte, and
    the weights tensor for tensor (the model files are rewritten, not copied)."""
    config = ZERO2.parent.parent / "config.py"
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert _run(capsys, "convert", ZERO2, ours, "--to", "internevo", "--state", "adapter", "--config", config)[0] == 0
    assert _run(capsys, "convert", ours, back, "--to", "internevo")[0] == 0
    state_files = [p.name for p in ZERO2.iterdir() if not p.name.startswith("model_")]
    assert len(state_files) == 9  # marker, context, sampler, schedules, 2 optimizer files, 2 plans, topology
    for name in state_files:
        assert (back / name).read_bytes() == (ZERO2 / name).read_bytes(), name
    assert _run(capsys, "verify", ZERO2, back)[0] == 0
