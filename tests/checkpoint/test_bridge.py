"""The checkpoint bridge: reshard matrix, round trips through every format, bad and hostile inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapter.checkpoint.convert import compare, open_checkpoint, target_layout, write_checkpoint
from adapter.checkpoint.formats.internevo import model_config_dict, shard_state_dict
from adapter.checkpoint.errors import CheckpointError
from adapter.checkpoint.io.safe_load import UnsafeCheckpointError, load_metadata
from adapter.config import RawConfig, normalize, read_config
from tests.conftest import CONFIGS, REPO, base_sections, render_sections
from tests.model.workers import random_logical

FIXTURES = REPO / "tests" / "fixtures" / "internevo"


def tiny_sections(family: str) -> dict:
    s = base_sections()
    s["model"].update(num_layers=6, num_attention_heads=8)
    if family == "internlm2":
        s["model_type"] = "INTERNLM2_PUBLIC"
        s["model"].update(num_kv_attention_heads=4, no_bias=False)
    elif family == "llama2":
        s["model_type"] = "LLAMA2"
        s["model"].update(num_kv_attention_heads=4)
    return s


def tiny_model(family: str):
    return normalize(RawConfig(tiny_sections(family), "tiny.py", {})).model


def write_internevo(folder: Path, logical, model, tp: int, pp: int, chunks: int) -> Path:
    layout = target_layout(model, tp, pp, chunks)
    folder.mkdir(parents=True)
    for p in range(pp):
        for t in range(tp):
            torch.save(shard_state_dict(logical, model, layout, t, p), folder / f"model_tp{t}_pp{p}.pt")
    torch.save(model_config_dict(model), folder / "model_config.pt")
    return folder


LAYOUTS = [(tp, pp, c) for tp in (1, 2, 4) for pp in (1, 2, 3) for c in (1, 2) if not (c == 2 and pp == 1)]


@pytest.mark.parametrize("family", ["internlm1", "internlm2", "llama2"])
def test_reshard_matrix_round_trips_bit_exact(tmp_path, family):
    model = tiny_model(family)
    logical = random_logical(model, 0)
    src = open_checkpoint(write_internevo(tmp_path / "src", logical, model, 2, 3, 2))
    assert src.layout.tp == 2 and src.layout.pp == 3 and src.layout.vpp == 2
    assert all(torch.equal(src.tensors[k], logical[k]) for k in logical)
    for i, (tp, pp, chunks) in enumerate(LAYOUTS):
        out = write_checkpoint(src, "internevo", tmp_path / f"ie{i}", target_layout(model, tp, pp, chunks))
        back = open_checkpoint(out)
        assert (back.layout.tp, back.layout.pp, back.layout.vpp) == (tp, pp, chunks)
        assert back.layout.stages == target_layout(model, tp, pp, chunks).stages
        assert compare(back, src) == []


@pytest.mark.parametrize("family", ["internlm1", "internlm2", "llama2"])
def test_internevo_mcore_internevo_is_bit_exact(tmp_path, family):
    model = tiny_model(family)
    src = open_checkpoint(write_internevo(tmp_path / "src", random_logical(model, 1), model, 4, 2, 2))
    mcore = open_checkpoint(write_checkpoint(src, "mcore-legacy", tmp_path / "m", target_layout(model, 2, 3, 2)), model)
    assert (mcore.layout.tp, mcore.layout.pp, mcore.layout.vpp) == (2, 3, 2)
    back = open_checkpoint(write_checkpoint(mcore, "internevo", tmp_path / "ie", target_layout(model, 4, 2, 2)))
    assert compare(back, src) == []
    # the files themselves are identical to the source's, key order included
    for name in ("model_tp0_pp0.pt", "model_tp3_pp1.pt"):
        a, b = torch.load(src.path / name, weights_only=True), torch.load(back.path / name, weights_only=True)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_fixture_shards_are_reproduced_exactly(tmp_path):
    for family in ("internlm1", "internlm2"):
        src = open_checkpoint(FIXTURES / f"{family}_tiny" / "ckpt")
        out = write_checkpoint(src, "internevo", tmp_path / family, src.layout)
        a = torch.load(FIXTURES / f"{family}_tiny" / "ckpt" / "model_tp0_pp0.pt", weights_only=True)
        b = torch.load(out / "model_tp0_pp0.pt", weights_only=True)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_internevo_tensor_parallel_layout_details(tmp_path):
    """Per-rank facts InternEvo's own files have (INTERNEVO_FORMAT.md §3.1-3.2)."""
    model = tiny_model("internlm1")
    logical = random_logical(model, 2)
    folder = write_internevo(tmp_path / "ie", logical, model, 2, 1, 1)
    r0 = torch.load(folder / "model_tp0_pp0.pt", weights_only=True)
    r1 = torch.load(folder / "model_tp1_pp0.pt", weights_only=True)
    h = model.hidden_size
    assert r0["embedding.weight"].shape == (model.vocab_size, h // 2)  # split on hidden
    assert r0["head.weight"].shape == (model.vocab_size // 2, h)  # split on vocabulary
    assert "blocks.0.mixer.out_proj.bias" in r0 and "blocks.0.mixer.out_proj.bias" not in r1
    q, k, v = logical["blocks.0.mixer.Wqkv.weight"].chunk(3)
    assert torch.equal(r1["blocks.0.mixer.Wqkv.weight"], torch.cat([q[h // 2:], k[h // 2:], v[h // 2:]]))


def test_uneven_vocab_head_split(tmp_path):
    s = base_sections()
    s["model"].update(vocab_size=131)
    model = normalize(RawConfig(s, "odd.py", {})).model
    logical = random_logical(model, 3)
    folder = write_internevo(tmp_path / "ie", logical, model, 2, 1, 1)
    heads = [torch.load(folder / f"model_tp{t}_pp0.pt", weights_only=True)["head.weight"].shape[0] for t in (0, 1)]
    assert heads == [66, 65]  # InternEvo gives the extra row to the first ranks
    assert compare(open_checkpoint(folder), open_checkpoint(write_internevo(tmp_path / "one", logical, model, 1, 1, 1))) == []


def test_legacy_2023_internlm1_naming_is_recognised(tmp_path):
    model = tiny_model("internlm1")
    logical = random_logical(model, 4)
    sd = shard_state_dict(logical, model, target_layout(model, 1, 1, 1), 0, 0)
    legacy = {}
    for key, value in sd.items():  # 2023 code: w2 = up, w3 = down; vocab-parallel embedding name
        key = key.replace("mlp.w2.", "mlp.@.").replace("mlp.w3.", "mlp.w2.").replace("mlp.@.", "mlp.w3.")
        legacy[key.replace("embedding.weight", "embedding.word_embeddings.weight")] = value
    (tmp_path / "old").mkdir()
    torch.save(legacy, tmp_path / "old" / "model_tp0_pp0.pt")
    torch.save(model_config_dict(model), tmp_path / "old" / "model_config.pt")
    old = open_checkpoint(tmp_path / "old")
    assert "2023" in old.generation
    assert all(torch.equal(old.tensors[k], logical[k]) for k in logical)


def test_bad_inputs_are_named_and_leave_nothing(tmp_path):
    model = tiny_model("internlm2")
    folder = write_internevo(tmp_path / "src", random_logical(model, 5), model, 2, 2, 1)
    # a missing rank
    missing = tmp_path / "missing"
    missing.mkdir()
    for f in folder.iterdir():
        if f.name != "model_tp1_pp0.pt":
            (missing / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="model_tp1_pp0.pt is missing"):
        open_checkpoint(missing)
    # a truncated file
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.name == "model_tp1_pp1.pt" else data)
    with pytest.raises(CheckpointError, match="model_tp1_pp1.pt"):
        open_checkpoint(truncated)
    # shards whose shapes do not fit together
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = torch.load(bad / "model_tp1_pp0.pt", weights_only=True)
    sd["layers.0.feed_forward.w2.weight"] = sd["layers.0.feed_forward.w2.weight"][:-1]
    torch.save(sd, bad / "model_tp1_pp0.pt")
    with pytest.raises(CheckpointError, match="do not fit together|w2"):
        open_checkpoint(bad)
    # a conversion that fails writes nothing
    src = open_checkpoint(folder)
    with pytest.raises(CheckpointError, match="--tp 3"):
        write_checkpoint(src, "internevo", tmp_path / "out", target_layout(model, 3, 1, 1))
    assert not (tmp_path / "out").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickles_are_refused_not_run(tmp_path):
    model = tiny_model("internlm1")
    folder = write_internevo(tmp_path / "src", random_logical(model, 6), model, 1, 1, 1)
    _Evil.marker = tmp_path / "pwned"
    torch.save({"model": _Evil()}, folder / "model_config.pt")
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        load_metadata(folder / "model_config.pt")
    with pytest.raises(CheckpointError, match="model_config.pt: cannot be read.*pass --config"):
        open_checkpoint(folder)  # through the bridge: one line naming the file, not a traceback
    sd = torch.load(folder / "model_tp0_pp0.pt", weights_only=True)
    sd["evil"] = _Evil()
    torch.save(sd, folder / "model_tp0_pp0.pt")
    with pytest.raises(CheckpointError, match="model_tp0_pp0.pt"):
        open_checkpoint(folder, model)
    assert not _Evil.marker.exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "adapter.cli.ckpt", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_cli_convert_inspect_verify_dry_run(tmp_path):
    src = FIXTURES / "internlm2_tiny" / "ckpt"
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    plan = _cli("convert", src, tmp_path / "x", "--to", "internevo", "--tp", "2", "--pp", "2", "--dry-run")
    assert plan.returncode == 0 and "model_tp1_pp1.pt" in plan.stdout and not (tmp_path / "x").exists()
    assert _cli("convert", src, tmp_path / "x", "--to", "internevo", "--tp", "2", "--pp", "2").returncode == 0
    inspect = _cli("inspect", tmp_path / "x")
    assert inspect.returncode == 0 and '"tp": 2' in inspect.stdout and '"family": "internlm2"' in inspect.stdout
    assert _cli("verify", src, tmp_path / "x").returncode == 0
    refused = _cli("convert", src, tmp_path / "x", "--to", "internevo")
    assert refused.returncode == 1 and "--overwrite" in refused.stderr
    other = _cli("convert", FIXTURES / "internlm1_tiny" / "ckpt", tmp_path / "y", "--to", "internevo")
    assert other.returncode == 0
    differ = _cli("verify", tmp_path / "x", tmp_path / "y")
    assert differ.returncode == 1
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before  # the source is never modified
    assert "Traceback" not in refused.stderr + differ.stderr


def _megatron_load_and_save(folder: str, saved: str, family: str, tp: int, pp: int, vpp: int) -> list:
    """In a spawned rank: megatron-core's own loader reads the checkpoint into a (tp, pp, vpp) model, which
    megatron-core's own saver then writes to ``saved`` (chunks split by the saving ranks)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from adapter.config import RawConfig, normalize, validate
    from adapter.config.to_mcore import model_options, transformer_config
    from adapter.model.build import build_model_chunks
    from adapter.model.mapping import chunk_state_dict, model_state
    from adapter.runtime.dist import init_distributed

    s = tiny_sections(family)
    s["model"]["num_chunks"] = vpp
    s["parallel"] = dict(tensor=tp, pipeline=dict(size=pp, interleaved_overlap=True))
    cfg = normalize(RawConfig(s, "tiny.py", {}))
    layout = validate(cfg, tp * pp)
    init_distributed(layout)
    chunks = build_model_chunks(transformer_config(cfg, layout, use_cpu_initialization=True), model_options(cfg))
    loaded = dist_checkpointing.load({f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}, folder)
    expected = random_logical(cfg.model, 7)
    wrong = []
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[f"model{i}"], strict=False)
        want = chunk_state_dict(expected, cfg.model, layout, ps.get_pipeline_model_parallel_rank(), i,
                                ps.get_tensor_model_parallel_rank())
        got = model_state(chunk)
        wrong += [k for k in want if not torch.equal(want[k], got[k])]
    dist_checkpointing.save({f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}, saved)
    return wrong


def _dcp_summary(folder: Path) -> dict:
    """Each key of a torch_dist folder: global shape and dtype for tensors, or ``bytes``."""
    from adapter.checkpoint.io.safe_load import load_dcp_metadata

    return {k: (tuple(v.size), v.properties.dtype) if hasattr(v, "chunks") else "bytes"
            for k, v in load_dcp_metadata(folder / ".metadata").state_dict_metadata.items()}


def _megatron_jobs(jobs: list[tuple]) -> list[list]:
    """``_megatron_load_and_save`` for each job in turn, in one set of spawned ranks."""
    return [_megatron_load_and_save(*job) for job in jobs]


MEGATRON_FAMILIES = ("internlm1", "internlm2")


@pytest.fixture(scope="module")
def megatron_round_trips(tmp_path_factory) -> dict:
    """Each family's ``--to mcore`` export, read by megatron-core's own loader at tp2 × pp2 × 2 virtual stages
    (an uneven split of 6 layers) and written back by its own saver from those ranks: one spawn for both."""
    from tests.spawn import spawn

    runs, jobs = {}, []
    for family in MEGATRON_FAMILIES:
        root = tmp_path_factory.mktemp(family)
        model = tiny_model(family)
        logical = random_logical(model, 7)
        src = write_internevo(root / "src", logical, model, 2, 1, 1)
        done = _cli("convert", src, root / "dist", "--to", "mcore")
        assert done.returncode == 0, done.stderr
        (root / "megatron").mkdir()
        jobs.append((str(root / "dist"), str(root / "megatron"), family, 2, 2, 2))
        runs[family] = (root, model, logical, src)
    wrong = spawn(_megatron_jobs, 4, jobs)
    return {family: (*runs[family], [rank[i] for rank in wrong]) for i, family in enumerate(MEGATRON_FAMILIES)}


@pytest.mark.multiproc
@pytest.mark.parametrize("family", MEGATRON_FAMILIES)
def test_torch_dist_and_megatron_read_each_other(megatron_round_trips, family):
    root, model, logical, src, wrong = megatron_round_trips[family]
    assert wrong == [[], [], [], []]  # megatron-core's loader, at tp2 × pp2 × vpp2, reads ours bit for bit
    ours, theirs = _dcp_summary(root / "dist"), _dcp_summary(root / "megatron")
    assert ours == theirs  # the same keys, global shapes, dtypes and extra-state objects
    assert len({f.name for f in (root / "megatron").glob("*.distcp")}) > 1
    # our reader assembles megatron's tensor-parallel chunks, bit-exact
    back = open_checkpoint(root / "megatron", model)
    assert all(torch.equal(back.tensors[k], logical[k]) for k in logical)
    config = root / "tiny.py"  # megatron's own folder does not record InternLM's sizes
    config.write_text(render_sections(tiny_sections(family)))
    assert _cli("convert", root / "megatron", root / "back", "--to", "internevo", "--tp", "2",
                "--config", config).returncode == 0
    assert _cli("verify", src, root / "back").returncode == 0


def test_deepspeed_files_load_through_the_allow_list(tmp_path):
    from adapter.checkpoint.io.safe_load import load_deepspeed_file

    _Evil.marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": {"x": _Evil()}}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        load_deepspeed_file(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not _Evil.marker.exists()


def _write_isp(folder: Path, logical: dict, model, tp: int, wp: int, pp: int) -> None:
    """An ISP folder as INTERNEVO_FORMAT.md §3.2 describes it: linears (weights and biases) cut on rows over
    the weight-parallel ranks, embedding on hidden and head on vocabulary over the tensor ranks, norms whole."""
    layout = target_layout(model, 1, pp, 1)
    plain = {p: shard_state_dict(logical, model, layout, 0, p) for p in range(pp)}  # tp=1 names and layers
    folder.mkdir(parents=True)
    for p in range(pp):
        for t in range(tp):
            for w in range(wp):
                out = {}
                for key, value in plain[p].items():
                    if key.endswith(("embedding.weight", "tok_embeddings.weight")):
                        out[key] = value.chunk(tp, dim=1)[t].clone()
                    elif key.endswith(("head.weight", "output.weight")):
                        n = value.shape[0]  # InternEvo: the first n % tp ranks get one more row
                        out[key] = value.split([n // tp + (r < n % tp) for r in range(tp)])[t].clone()
                    elif "norm" in key:
                        out[key] = value.clone()
                    else:
                        out[key] = value.chunk(wp, dim=0)[w].clone()
                torch.save(out, folder / f"model_tp{t}_wp{w}_pp{p}.pt")
    torch.save(model_config_dict(model), folder / "model_config.pt")


@pytest.mark.parametrize("family", ["internlm1", "internlm2"])
def test_isp_folders_are_read(tmp_path, family):
    model = tiny_model(family)
    logical = random_logical(model, 8)
    _write_isp(tmp_path / "isp", logical, model, tp=2, wp=2, pp=2)
    src = open_checkpoint(tmp_path / "isp")
    assert (src.layout.tp, src.layout.pp) == (2, 2)
    assert src.tensors.keys() == logical.keys()
    assert all(torch.equal(src.tensors[k], logical[k]) for k in logical)
    out = write_checkpoint(src, "internevo", tmp_path / "plain", target_layout(model, 2, 2, 1))
    assert compare(open_checkpoint(out), src) == []
    (tmp_path / "isp" / "model_tp1_wp1_pp0.pt").unlink()
    with pytest.raises(CheckpointError, match="model_tp1_wp1_pp0.pt is missing"):
        open_checkpoint(tmp_path / "isp")


def test_cli_explicit_pp_does_not_inherit_the_configs_chunks(tmp_path, capsys):
    """``internlm_configs/tiny.py`` is laid out as pp=2 × 2 chunks; ``--tp 1 --pp 1`` with it means one stage
    of one chunk, not "--vpp needs --pp > 1". Without ``--pp`` the config's whole layout applies."""
    from adapter.cli.ckpt import main

    config = CONFIGS / "tiny.py"
    model = read_config(config)[0].model
    src = tmp_path / "src"
    src.mkdir()
    torch.save(shard_state_dict(random_logical(model, 0), model, target_layout(model, 1, 1, 1), 0, 0),
               src / "model_tp0_pp0.pt")
    assert main(["convert", str(src), str(tmp_path / "one"), "--to", "internevo", "--tp", "1", "--pp", "1",
                 "--config", str(config)]) == 0
    assert main(["inspect", str(tmp_path / "one"), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert '"pp": 1' in out and '"vpp": 1' in out
    assert main(["convert", str(src), str(tmp_path / "cfg"), "--to", "internevo", "--config", str(config)]) == 0
    assert main(["inspect", str(tmp_path / "cfg"), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert '"pp": 2' in out and '"vpp": 2' in out


def test_verify_is_bit_exact_and_nan_aware(tmp_path):
    """``verify`` (atol 0) compares bytes: the same NaN at the same place matches, a NaN against a number or
    a different float does not."""
    model = tiny_model("internlm2")
    logical = random_logical(model, 12)
    key = next(iter(logical))
    logical[key][0, 0] = float("nan")
    a = open_checkpoint(write_internevo(tmp_path / "a", logical, model, 1, 1, 1))
    b = open_checkpoint(write_internevo(tmp_path / "b", logical, model, 2, 1, 1))
    assert compare(a, b) == []
    logical[key][0, 0] = 1.0
    c = open_checkpoint(write_internevo(tmp_path / "c", logical, model, 1, 1, 1))
    assert [p.split(":")[0] for p in compare(a, c)] == [key]
    assert compare(a, c, atol=10.0) != []  # a NaN against a number is never within a tolerance


def test_safetensors_header_past_the_end_is_refused(tmp_path):
    import struct

    hf = tmp_path / "hf"
    write_checkpoint(open_checkpoint(FIXTURES / "internlm2_tiny" / "ckpt"), "hf", hf, None)
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(CheckpointError, match="header length 4611686018427387904 is past the end"):
        open_checkpoint(hf)
