"""A resume's folders checked by the ranks in turn, pipeline stage by stage (``train.open_shared``): an
optimizer folder written at another layout than the first, holding a stray tensor or replicas that differ,
is refused on every rank before anything is read, naming its file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from adapter.cli.ckpt import main as ckpt_main
from tests.conftest import FIXTURES
from tests.spawn import spawn

SRC = FIXTURES / "internlm2_tiny" / "ckpt"


def _open(folders: list[list[str]]) -> list[str]:
    """In each rank: ``open_folders`` of each list of folders (one writer), and what it raised."""
    import torch.distributed as dist

    from adapter.checkpoint.formats.internevo import read_internevo
    from adapter.train.open_shared import open_folders

    dist.init_process_group("gloo")
    model = read_internevo(SRC).model
    out = []
    for paths in folders:
        try:
            opened = open_folders([Path(p) for p in paths], model, one_writer=True)
            out.append(f"ok {len(opened)}")
        except Exception as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    dist.destroy_process_group()
    return out


@pytest.mark.multiproc
def test_a_folder_of_another_layout_is_refused_everywhere(tmp_path):
    """Beside a pp=2 folder (its stages checked by ranks 0 and 1, the next folder's by 0 and 1 again): the
    same at pp=2 opens; at tensor parallel 2 (each file a half) each rank finds its stage's pieces the wrong
    shape; at pp=1 stage 1's file is missing; with a stray tensor in stage 1's file, or a replica that
    differs from tensor rank 0's, rank 1 finds it and rank 0 stops quoting it."""
    for name, tp, pp in (("pp2", 1, 2), ("tp2_pp2", 2, 2), ("pp1", 1, 1)):
        assert ckpt_main(["convert", str(SRC), str(tmp_path / name), "--to", "internevo", "--tp", str(tp),
                          "--pp", str(pp)]) == 0
    shutil.copytree(tmp_path / "pp2", tmp_path / "stray")
    stage1 = tmp_path / "stray" / "model_tp0_pp1.pt"
    torch.save({**torch.load(stage1, weights_only=True), "layers.0.attention.stray.weight": torch.zeros(2)}, stage1)
    shutil.copytree(tmp_path / "tp2_pp2", tmp_path / "replica")
    replica = tmp_path / "replica" / "model_tp1_pp1.pt"
    tensors = torch.load(replica, weights_only=True)
    tensors["norm.weight"] = tensors["norm.weight"] + 1e-3
    torch.save(tensors, replica)
    names = ("pp2", "tp2_pp2", "pp1", "stray")
    pairs = [[str(tmp_path / "pp2"), str(tmp_path / n)] for n in names]
    pairs += [[str(tmp_path / "tp2_pp2"), str(tmp_path / n)] for n in ("tp2_pp2", "replica")]
    ok, tp2, pp1, stray, ok_tp2, differs = zip(*spawn(_open, 2, pairs))
    assert ok == ok_tp2 == ("ok 2", "ok 2")
    # a replica is compared by the rank that checks its stage (rank 1), not by the ranks that read it
    differ = f"CheckpointError: {replica}: norm.weight differs from its replica in model_tp0_pp1.pt"
    assert differs == (differ,) * 2
    assert tp2[0] == (f"CheckpointError: {tmp_path / 'tp2_pp2'}: tok_embeddings.weight (stage 0) is (128, 32) in "
                      "the files but (128, 64) for the model the config describes")
    assert tp2[1].startswith(f"CheckpointError: {tmp_path / 'tp2_pp2'}: ") and "(stage 1) is (64, 64) in the files" in tp2[1]
    assert all(e.startswith(f"CheckpointError: {tmp_path / 'pp1' / 'model_tp0_pp1.pt'}: missing") for e in pp1)
    found = f"{stage1}: unexpected tensor layers.0.attention.stray.weight"
    assert stray == (f"CheckpointError: {found}: no internlm2 model of these sizes holds it in this file",) * 2
