"""Training checkpoints: exact resume across process restarts, incomplete folders, weights-only loading."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from adapter.checkpoint.convert import compare, open_checkpoint
from adapter.cli.ckpt import main as ckpt_main
from adapter.train.state_files import latest_checkpoint
from adapter.config import RawConfig, normalize, validate
from tests.conftest import REPO, base_sections
from tests.spawn import spawn


def _config(save: str, total_steps: int = 6, tp: int = 1, pp: int = 2, vpp: int = 2, sp: bool = False,
            micro_num: int = 4, dtype: str = "torch.float32", **ckpt):
    """dp × pp × virtual stages (default 2 × 2) on the shipped tiny dataset (dp from the world size)."""
    s = base_sections()
    s["model"].update(num_layers=4, num_chunks=vpp, vocab_size=264, dtype=dtype)
    s["data"].update(seq_len=32, micro_bsz=2, micro_num=micro_num, total_steps=total_steps,
                     train_folder=str(REPO / "launch/data/tiny"))
    s["adam"].update(lr=3e-3)
    s["parallel"] = dict(zero1=-1, tensor=dict(size=tp, mode="msp" if sp else "mtp"),
                         pipeline=dict(size=pp, interleaved_overlap=True))
    s["ckpt"] = {**dict(enable_save_ckpt=True, save_ckpt_folder=f"local:{save}", checkpoint_every=3,
                        oss_snapshot_freq=0, auto_resume=True), **ckpt}
    s["enable_tb"] = False
    cfg = normalize(RawConfig(s, "resume.py", {}))
    return cfg, validate(cfg, int(os.environ.get("WORLD_SIZE", "4")))


def _run(save: str, max_steps: int | None, ckpt: dict, total_steps: int = 6, layout: dict | None = None,
         window: int | None = None) -> list | None:
    """One run; ``window``: the bytes of ZeRO receive buffers its saves post ahead (``ZeroStates.WINDOW``)."""
    import torch.distributed as dist

    from adapter.train.loop import RunOptions, train
    from adapter.train.optimizer_state import ZeroStates

    cfg, layout = _config(save, total_steps, **(layout or {}), **ckpt)
    default = ZeroStates.WINDOW
    ZeroStates.WINDOW = default if window is None else window
    try:
        records = train(cfg, layout, RunOptions(max_steps=max_steps))
    finally:
        ZeroStates.WINDOW = default
    return [(r["step"], r["loss"], r["batch_count"]) for r in records] if dist.get_rank() == 0 else None


def _runs(jobs: list[tuple]) -> list:
    """Several ``_run`` in turn in one set of processes (separate runs; a restart is a new spawn)."""
    return [_run(*job) for job in jobs]


@pytest.mark.multiproc
@pytest.mark.slow
def test_resume_after_restart_is_exact(tmp_path):
    """dp=2 × pp=2 × 2 virtual stages: 6 steps in one go equal 3 steps, a restart, and 3 more; in fp32 and in
    bf16, where the resumed weights are the bf16 casts of the saved fp32 master weights (and whose save posts
    one parameter's ZeRO receives at a time, as an accelerator's window does for large models)."""
    bf16 = {"dtype": "torch.bfloat16"}
    whole, first, whole16, first16 = spawn(_runs, 4, [(str(tmp_path / "a"), None, {}), (str(tmp_path / "b"), 3, {}),
                                                      (str(tmp_path / "a16"), None, {}, 6, bf16),
                                                      (str(tmp_path / "b16"), 3, {}, 6, bf16, 1)])[0]
    assert [r[0] for r in first] == [1, 2, 3] and (tmp_path / "b" / "3" / "3.step").exists()
    # a bf16 checkpoint's weights are its fp32 masters cast to bf16, bit for bit (what a resume relies on)
    cfg16, _ = _config(str(tmp_path / "b16"), **bf16)
    weights16 = open_checkpoint(tmp_path / "b16" / "3")
    masters16 = open_checkpoint(tmp_path / "b16" / "3" / "optimizer" / "fp32", cfg16.model)
    assert {weights16.tensors[k].dtype for k in weights16.tensors} == {torch.bfloat16}
    assert all(torch.equal(masters16.tensors[k].to(torch.bfloat16), weights16.tensors[k]) for k in weights16.tensors)
    # new processes: auto-resume from b/3 (and b16/3); then, from a/6, the weights alone (a fresh optimizer, step 0)
    second, fresh, second16 = spawn(_runs, 4, [(str(tmp_path / "b"), None, {}),
                                               (str(tmp_path / "c"), 1, {"load_model_only_folder": f"local:{tmp_path}/a/6",
                                                                         "auto_resume": False}),
                                               (str(tmp_path / "b16"), None, {}, 6, bf16)])[0]
    assert [r[0] for r in second] == [4, 5, 6]
    assert [r[2] for r in second] == [r[2] for r in whole[3:]]  # the data continues where it stopped
    assert [r[1] for r in first + second] == pytest.approx([r[1] for r in whole], rel=1e-6)
    a, b = open_checkpoint(tmp_path / "a" / "6"), open_checkpoint(tmp_path / "b" / "6")
    assert compare(a, b, atol=1e-6) == []
    assert [r[1] for r in first16 + second16] == [r[1] for r in whole16]  # bit for bit
    assert compare(open_checkpoint(tmp_path / "a16" / "6"), open_checkpoint(tmp_path / "b16" / "6"), atol=0) == []
    # in an fp32 run ZeRO's master weights are the model's: the optimizer's fp32 files equal the weights
    cfg, _ = _config(str(tmp_path / "a"))
    masters = open_checkpoint(tmp_path / "a" / "6" / "optimizer" / "fp32", cfg.model)
    assert compare(a, masters) == []
    moments = open_checkpoint(tmp_path / "a" / "6" / "optimizer" / "exp_avg_sq", cfg.model)
    assert all(moments.tensors[k].min() >= 0 and moments.tensors[k].max() > 0 for k in moments.tensors)
    # a folder without its completion marker is never picked
    partial = tmp_path / "b" / "9"
    shutil.copytree(tmp_path / "b" / "6", partial)
    (partial / "6.step").unlink()
    assert latest_checkpoint(tmp_path / "b", None) == tmp_path / "b" / "6"
    assert fresh[0][0] == 1 and fresh[0][1] < whole[0][1]  # weights only: starts from the trained model's lower loss


PP_VPP = {"pp": 2, "vpp": 2}


@pytest.fixture(scope="module")
def pp_vpp_runs(tmp_path_factory) -> tuple[Path, list, list]:
    """pp=2 × 2 virtual stages on 2 processes: 6 steps in one go (``a``), and 3 steps saved (``b``), which
    the tests below copy and resume in other ways."""
    root = tmp_path_factory.mktemp("pp_vpp")
    whole, first = spawn(_runs, 2, [(str(root / "a"), None, {}, 6, PP_VPP), (str(root / "b"), 3, {}, 6, PP_VPP)])[0]
    return root, whole, first


@pytest.mark.multiproc
@pytest.mark.slow
def test_resume_at_another_layout(tmp_path, pp_vpp_runs, capsys):
    """6 steps at pp=2 × 2 virtual stages equal 3 steps there, a save, and 3 more at pp=1 on one process from
    the checkpoint resharded to pp=1 by ``internlm-ckpt convert`` (each optimizer state cut like the weights),
    or 2 more at tp=2 with sequence parallelism (the trainer reshards the checkpoint as it loads it), a save,
    and the last at pp=2 without virtual stages: the
    optimizer state goes wherever the weights go."""
    root, whole, first = pp_vpp_runs
    saved = root / "b" / "3"
    state = _inspect_state(capsys, saved)  # what the trainer wrote, as inspect reports it
    assert state["kind"] == "adapter" and state["step"] == 3 and state["problems"] == []
    assert state["optimizer"] == {"format": "adapter", "states": ["fp32", "exp_avg", "exp_avg_sq"],
                                  "adam_steps": [3], "tp": 1, "pp": 2, "vpp": 2, "dtype": "float32"}
    assert state["sampler"]["data_world_size"] == 1 and state["sampler"]["batch_count"] == whole[3][2]
    assert state["context"]["step_count"] == 3
    (tmp_path / "b").mkdir()
    assert ckpt_main(["convert", str(saved), str(tmp_path / "b" / "3"), "--to", "internevo", "--pp", "1",
                      "--state", "adapter"]) == 0
    _assert_cut_like_the_weights(saved, tmp_path / "b" / "3")
    shutil.copytree(root / "b", tmp_path / "c")
    pp1 = spawn(_run, 1, str(tmp_path / "b"), None, {}, 6, {"pp": 1, "vpp": 1})[0]
    # two steps at tp2 with sequence parallelism, a save, then (a new run in the same processes) pp2 from it
    tp2, then_pp2 = spawn(_runs, 2, [(str(tmp_path / "c"), 5, {"checkpoint_every": 1}, 6,
                                      {"tp": 2, "pp": 1, "vpp": 1, "sp": True}),
                                     (str(tmp_path / "c"), None, {}, 6, {"pp": 2, "vpp": 1})])[0]
    assert [r[0] for r in tp2] == [4, 5] and (tmp_path / "c" / "5" / "5.step").exists()
    for second in (pp1, tp2 + then_pp2):
        assert [r[0] for r in second] == [4, 5, 6]
        assert [r[2] for r in second] == [r[2] for r in whole[3:]]
        assert [r[1] for r in first + second] == pytest.approx([r[1] for r in whole], rel=1e-6)
    reference = open_checkpoint(root / "a" / "6")
    for folder in ("b", "c"):
        assert compare(open_checkpoint(tmp_path / folder / "6"), reference, atol=1e-6) == []


def _inspect_state(capsys, folder: Path) -> dict:
    capsys.readouterr()
    assert ckpt_main(["inspect", str(folder)]) == 0
    return json.loads(capsys.readouterr().out)["state"]


def _assert_cut_like_the_weights(original: Path, converted: Path) -> None:
    """At tp1 pp1 a model file holds the logical tensors: each state of ``converted`` must be the original's,
    joined from its pp2 × vpp2 files, and the small files must be carried byte for byte."""
    import torch

    cfg, _ = _config(str(original), **PP_VPP)
    for state in ("", "optimizer/fp32", "optimizer/exp_avg", "optimizer/exp_avg_sq"):
        whole = dict(open_checkpoint(original / state, cfg.model).tensors)
        got = torch.load(converted / state / "model_tp0_pp0.pt", weights_only=True)
        assert got.keys() == whole.keys() and all(torch.equal(got[k], v) for k, v in whole.items()), state
    for name in ("context.pt", "sampler.pt", "schedulder.pt", "optimizer/state.pt"):
        assert (converted / name).read_bytes() == (original / name).read_bytes(), name
    assert torch.load(converted / "3.step", weights_only=True) == {"step": 3}


def _resumed(folder: str, layout: dict):
    """In spawned ranks: a trainer that resumed ``folder`` (its config, layout and trainer)."""
    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.runtime.dist import init_distributed
    from adapter.train.engine import Trainer
    from adapter.train.state_files import load_model_weights, load_training_state

    cfg, layout = _config(folder, **layout)
    init_distributed(layout)
    chunks = build_model_chunks(transformer_config(cfg, layout, use_cpu_initialization=True), model_options(cfg))
    load_model_weights(Path(folder), cfg, layout, chunks, "test")
    trainer = Trainer(cfg, layout, chunks, transformer_config(cfg, layout, use_cpu_initialization=True))
    context = load_training_state(Path(folder), cfg, layout, trainer, True, "test")
    return cfg, layout, trainer, context


def _rewrite_as_earlier_version(folder: str) -> None:
    """In spawned ranks: turn a checkpoint into what earlier versions wrote (DeepSpeed's own engine checkpoint
    under ``deepspeed/``, no ``optimizer/``), by resuming it and saving the engine with DeepSpeed's saver."""
    import torch.distributed as dist

    from adapter.runtime.dist import destroy_distributed
    from adapter.train.state_files import DEEPSPEED_TAG

    _, _, trainer, _ = _resumed(folder, PP_VPP)
    trainer.deepspeed.save_checkpoint(folder, tag=DEEPSPEED_TAG, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(Path(folder) / "optimizer")
    destroy_distributed()


def _save_again(folder: str, jobs: list[tuple[dict, list[tuple[str, bool]]]]) -> None:
    """In spawned ranks: for each ``(layout, targets)``, resume ``folder`` at ``layout`` and save it into each
    ``(target, shared)`` (one process group throughout: megatron-core's groups are made again for each)."""
    from types import SimpleNamespace

    from adapter.runtime.dist import destroy_distributed
    from adapter.train.state_files import save_checkpoint

    for layout, targets in jobs:
        cfg, layout, trainer, context = _resumed(folder, layout)
        state = context.pop("sampler")
        sampler = SimpleNamespace(state_dict=lambda: state)
        for target, shared in targets:
            save_checkpoint(Path(target), cfg, layout, trainer, sampler, context, trainer.step_count, shared=shared)
    destroy_distributed()


@pytest.mark.multiproc
@pytest.mark.slow
def test_checkpoints_of_earlier_versions_still_resume(tmp_path, pp_vpp_runs):
    """A checkpoint holding DeepSpeed's own optimizer files (what earlier versions wrote) resumes exactly at
    the layout that wrote it."""
    root, whole, first = pp_vpp_runs
    shutil.copytree(root / "b", tmp_path / "b")
    spawn(_rewrite_as_earlier_version, 2, str(tmp_path / "b" / "3"))
    assert (tmp_path / "b" / "3" / "deepspeed").is_dir() and not (tmp_path / "b" / "3" / "optimizer").exists()
    second = spawn(_run, 2, str(tmp_path / "b"), None, {}, 6, PP_VPP)[0]
    assert [r[1] for r in first + second] == pytest.approx([r[1] for r in whole], rel=1e-6)


@pytest.mark.multiproc
@pytest.mark.slow
def test_resume_at_another_data_parallel_size(tmp_path):
    """Data parallel 2 → 1 with the global batch kept (micro_num 4 → 8): the same rows in the same steps, so
    the run continues as it would have; a changed global batch is refused. On the way, the dp2 checkpoint
    resumed and saved again, by both ranks together and by one rank per file, gives its own bytes back, and
    resumed at tensor parallel 2 and saved both ways, the same tensors in the same bytes either way."""
    dp2, dp1 = {"pp": 1, "vpp": 1}, {"pp": 1, "vpp": 1, "micro_num": 8}
    whole, first = spawn(_runs, 2, [(str(tmp_path / "a"), None, {}, 6, dp2), (str(tmp_path / "b"), 3, {}, 6, dp2)])[0]
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    # each file's two data-parallel ranks write it together (each the units its ZeRO partition holds most
    # of), or, where they share no file system, one of them all of it: the same bytes, and what the run wrote.
    # Resumed at tensor parallel 2, likewise: each tensor rank writes its vocabulary rows of the embedding
    # into both tensor ranks' files, or the ranks exchange them first and each writes its own file
    together, alone = tmp_path / "together", tmp_path / "alone"
    tp2 = {"tp": 2, "pp": 1, "vpp": 1, "micro_num": 8}
    spawn(_save_again, 2, str(tmp_path / "c" / "3"), [(dp2, [(str(together), True), (str(alone), False)]),
                                                      (tp2, [(str(together / "tp2"), True), (str(alone / "tp2"), False)])])
    written = sorted(p.relative_to(together) for p in together.rglob("model_tp*.pt"))
    assert len(written) == 12 and written == sorted(p.relative_to(alone) for p in alone.rglob("model_tp*.pt"))
    for name in written:
        assert zipfile.ZipFile(together / name).testzip() is None, name  # zipfile checks every CRC
        assert (together / name).read_bytes() == (alone / name).read_bytes(), name
        if name.parts[0] != "tp2":
            assert (together / name).read_bytes() == (tmp_path / "c" / "3" / name).read_bytes(), name
    for state in ("", "optimizer/fp32", "optimizer/exp_avg", "optimizer/exp_avg_sq"):
        assert compare(open_checkpoint(together / "tp2" / state), open_checkpoint(tmp_path / "c" / "3" / state)) == []
    second = spawn(_run, 1, str(tmp_path / "b"), None, {}, 6, dp1)[0]
    assert [r[0] for r in second] == [4, 5, 6]
    assert [r[1] for r in first + second] == pytest.approx([r[1] for r in whole], rel=1e-6)
    assert compare(open_checkpoint(tmp_path / "b" / "6"), open_checkpoint(tmp_path / "a" / "6"), atol=1e-6) == []
    with pytest.raises(RuntimeError, match="keep the global batch"):
        spawn(_run, 1, str(tmp_path / "c"), None, {}, 6, {"pp": 1, "vpp": 1})


@pytest.mark.multiproc
def test_snapshots_and_stop_file(tmp_path):
    stop = tmp_path / "stop"
    stop.write_text("7")  # +7: save at step 7 and stop
    records = spawn(_run, 2, str(tmp_path / "s"), None,
                    {"checkpoint_every": 4, "oss_snapshot_freq": 2, "stop_file_path": str(stop)}, 20)[0]
    assert [r[0] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    root = tmp_path / "s"
    assert (root / "snapshot" / "0" / "2.step").exists()  # step 2: the first snapshot slot
    assert (root / "4" / "4.step").exists()  # step 4: a normal checkpoint takes precedence over the snapshot
    assert (root / "snapshot" / "1" / "6.step").exists()  # step 6: the other slot
    assert (root / "7" / "7.step").exists() and not (root / "8").exists()
    assert latest_checkpoint(root, root / "snapshot") == root / "7"


def _crash_config(tmp_path: Path) -> Path:
    config = tmp_path / "crash.py"
    text = (REPO / "internlm_configs" / "tiny.py").read_text()
    text = text.replace('save_ckpt_folder="local:runs/tiny/ckpt"', f'save_ckpt_folder="local:{tmp_path}/ckpt"')
    text = text.replace("checkpoint_every=20", "checkpoint_every=2").replace("auto_resume=False", "auto_resume=True")
    text = text.replace('train_folder="launch/data/tiny"', f'train_folder="{REPO}/launch/data/tiny"')
    # a wider model, so that writing a checkpoint takes long enough to be interrupted
    text = text.replace("HIDDEN_SIZE = 64", "HIDDEN_SIZE = 512").replace("NUM_ATTENTION_HEAD = 4", "NUM_ATTENTION_HEAD = 8")
    config.write_text(text)
    return config


def _launch(config: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    from tests.spawn import free_port

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(REPO / "launch" / "train.py"), "--config", str(config), *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _tree(pid: int) -> list[int]:
    """A process and all its descendants (torchrun starts its workers in their own sessions), leaves first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree[::-1]


def _kill(pids: list[int]) -> None:
    for victim in pids:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _metrics(run: Path) -> list[list[dict]]:
    """``metrics.jsonl`` (appended across launches) split into launches, where the step goes back."""
    launches: list[list[dict]] = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if not launches or record["step"] <= launches[-1][-1]["step"]:
            launches.append([])
        launches[-1].append(record)
    return launches


@pytest.mark.multiproc
@pytest.mark.slow
def test_kill_during_checkpoint_write_resumes_from_previous_complete(tmp_path):
    """kill -9 of every rank while a checkpoint's optimizer state is being written (``optimizer/`` has files,
    the marker is not there yet): the folder is incomplete for the trainer and for ``internlm-ckpt``, and a
    restart resumes from the previous complete checkpoint and repeats the interrupted steps exactly. The killed
    run is the uninterrupted reference (its logged losses, from step 1 up to the kill); with a checkpoint every
    2 steps the repeated steps include one after an update from the restored optimizer state."""
    config = _crash_config(tmp_path)
    proc = _launch(config, tmp_path)
    ckpt = tmp_path / "ckpt"
    deadline = time.monotonic() + 300
    killed_in, victims = None, None
    while time.monotonic() < deadline and proc.poll() is None:
        if victims is None and (ckpt / "2" / "2.step").exists():
            # the workers are up: found now, so that the kill lands within the save's last milliseconds
            victims = _tree(proc.pid)
        for folder in ckpt.glob("[0-9]*"):
            if victims is None or int(folder.name) < 4 or (folder / f"{folder.name}.step").exists():
                continue
            optimizer = folder / "optimizer"  # finished files only: each is written under a temporary name
            if any(optimizer.glob("*/*.pt")):
                _kill(victims)  # mid-write: optimizer files there, marker not yet
                _kill(_tree(proc.pid))  # anything started since
                killed_in = folder
                break
        if killed_in:
            break
        time.sleep(0.002)
    proc.wait()
    assert killed_in is not None, "the run ended before a checkpoint write could be interrupted"
    assert not list(killed_in.glob("*.step")), "the save finished before the kill landed"
    step = int(killed_in.name)
    previous = latest_checkpoint(ckpt, None)
    assert previous is not None and int(previous.name) == step - 2
    for state in ("internevo", "adapter"):  # the CLI refuses it too, in either form (messages: test_ckpt_state)
        rc = ckpt_main(["convert", str(killed_in), str(tmp_path / "converted"), "--to", "internevo", "--state", state])
        assert rc == 1 and not (tmp_path / "converted").exists(), state
    resumed = _launch(config, tmp_path, "--max-steps", str(step))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]
    killed, again = _metrics(tmp_path / "runs" / "tiny")
    assert [r["step"] for r in killed] == list(range(1, step + 1))
    assert [r["step"] for r in again] == [step - 1, step]  # right after the last complete checkpoint
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in killed[-2:]], rel=1e-6, abs=0)
    assert [r["batch_count"] for r in again] == [r["batch_count"] for r in killed[-2:]]
    assert (killed_in / f"{step}.step").exists()  # the interrupted save, made again whole
