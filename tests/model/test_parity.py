"""The parallel model against its single-rank self, InternEvo's own forward, and transformers' Llama.

One 4-process gloo run builds both families in every layout of ``workers.LAYOUTS`` from the same logical
weights and packed batches, runs a forward and a forward+backward through megatron-core's schedule, and
returns logits, losses and (logical) gradients; the tests compare them with the tp=1, pp=1 reference. The
same run loads the InternEvo-written fixture checkpoints at tp=1 and at tp=2 × pp=2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.model.workers import LAYOUTS
from tests.model import workers
from tests.spawn import spawn

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "internevo"
FAMILIES = ["internlm1", "internlm2"]
RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def matrix():
    fixtures = {f: str(FIXTURES / f"{f}_tiny") for f in FAMILIES + ["llama2"]}
    return spawn(__import__("tests.model.workers", fromlist=["parity_matrix"]).parity_matrix, 4, FAMILIES,
                 list(LAYOUTS), fixtures)[0]


LAYOUT_CASES = [(f, n) for f in FAMILIES for n in LAYOUTS if n != "reference"]


@pytest.mark.multiproc
@pytest.mark.parametrize("family, layout", LAYOUT_CASES)
def test_logits_and_losses_match_single_rank(matrix, family, layout):
    got, ref = matrix[(family, layout)], matrix[(family, "reference")]
    assert len(got["logits"]) == len(ref["logits"]) == 4
    for a, b in zip(got["logits"], ref["logits"]):
        assert a.shape == b.shape and rel(a, b) <= RTOL
    for a, b in zip(got["losses"], ref["losses"]):
        assert abs(a - b) / abs(b) <= RTOL
    # the training pass sees the same losses as the forward-only pass
    assert got["train_losses"] == pytest.approx(got["losses"], rel=RTOL)


@pytest.mark.multiproc
@pytest.mark.parametrize("family, layout", LAYOUT_CASES)
def test_gradients_match_single_rank(matrix, family, layout):
    got, ref = matrix[(family, layout)]["grads"], matrix[(family, "reference")]["grads"]
    assert got.keys() == ref.keys() == matrix[(family, "reference")]["weights"].keys()
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        assert rel(got[name], ref[name]) <= RTOL, name
        assert ref[name].abs().max() > 0, f"{name} got no gradient"


@pytest.mark.multiproc
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_mean_token_cross_entropy(matrix, family):
    from tests.model.workers import random_batches

    ref = matrix[(family, "reference")]
    for logits, batch, loss in zip(ref["logits"], random_batches(0), ref["losses"]):
        expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=-100)
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        assert 3.5 < loss < 6.5  # random weights: about ln(128); the test data are not degenerate


@pytest.mark.multiproc
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_row_equals_pieces_alone(matrix, family):
    ref = matrix[(family, "reference")]
    bounds = ref["cu_seqlens"].tolist()
    assert len(bounds) > 2
    for (a, b), piece in zip(zip(bounds[:-1], bounds[1:]), ref["piece_logits"]):
        assert rel(ref["packed_logits"][:, a:b], piece) <= RTOL
    assert rel(ref["packed_logits"], ref["logits"][0]) <= RTOL  # what the schedule computed
    # negative control: without cu_seqlens the second piece attends to the first and changes
    a, b = bounds[1], bounds[2]
    assert rel(ref["row_causal_logits"][:, a:b], ref["packed_logits"][:, a:b]) > 1e-3


@pytest.mark.multiproc
@pytest.mark.parametrize("family", FAMILIES + ["llama2"])
@pytest.mark.parametrize("layout", ["tp1_pp1", "tp2_pp2"])
def test_internevo_fixture_logits(matrix, family, layout):
    expected = torch.load(FIXTURES / f"{family}_tiny" / "logits.pt", weights_only=True)
    got = matrix[(family, f"fixture_{layout}")]
    assert got.shape == expected.shape
    assert rel(got, expected) <= RTOL


@pytest.mark.multiproc
@pytest.mark.parametrize("family", FAMILIES)
def test_recompute_follows_internevo_rule(matrix, family):
    # InternEvo recomputes the first int(local_layers * ratio) layers of every chunk
    uneven = matrix[(family, "pp2_vpp2_uneven_recompute")]["recomputed"]
    assert uneven == {(0, 0): (0, 1), (0, 1): (0, 1), (1, 0): (1, 2), (1, 1): (1, 2)}
    full = matrix[(family, "tp2_sp_pp2_vpp2_recompute")]["recomputed"]
    assert all(n == 1 for n, _ in full.values())  # uniform, one layer per checkpoint: every layer
    assert matrix[(family, "reference")]["recomputed"] == {(0, 0): (0, 6)}


@pytest.mark.multiproc
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_llama_oracle_on_random_weights(matrix, family):
    """The same random weights in transformers' LlamaForCausalLM give the same logits."""
    transformers = pytest.importorskip("transformers")
    from adapter.checkpoint.formats.hf import hf_config, internevo_to_hf
    from tests.model.workers import tiny_config

    ref = matrix[(family, "reference")]
    cfg, _ = tiny_config(family)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg.model)))
    llama.config._attn_implementation = "eager"
    llama.load_state_dict(internevo_to_hf(ref["weights"], cfg.model), strict=True)
    with torch.no_grad():
        logits = llama.eval()(ref["tokens"]).logits
    assert rel(ref["unpacked_logits"], logits) <= RTOL


def _smoothed_losses(smoothing: float) -> dict:
    """On 2 tensor ranks: token_losses (values and logits gradients) against torch's cross-entropy."""
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps

    from adapter.model.forward import token_losses
    from tests.model.workers import tiny_config
    from adapter.runtime.dist import init_distributed

    _, layout = tiny_config("internlm1", tp=2, world_size=2)
    init_distributed(layout)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 128, generator=g) * 3
    labels = torch.randint(0, 128, (2, 6), generator=g)
    labels[0, 2] = -100
    rank = ps.get_tensor_model_parallel_rank()
    mine = logits[..., rank * 64:(rank + 1) * 64].clone().requires_grad_()
    ours = token_losses(mine, labels, smoothing)
    ours.sum().backward()
    full = logits.clone().requires_grad_()
    ref = F.cross_entropy(full.reshape(-1, 128), labels.reshape(-1), ignore_index=-100, reduction="none",
                          label_smoothing=smoothing).reshape(2, 6)
    ref.sum().backward()
    return {"ours": ours.detach(), "ref": ref.detach(), "grad": mine.grad,
            "ref_grad": full.grad[..., rank * 64:(rank + 1) * 64]}


@pytest.mark.multiproc
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_smoothing_matches_torch_under_tensor_parallelism(smoothing):
    for result in spawn(_smoothed_losses, 2, smoothing):
        assert rel(result["ours"], result["ref"]) <= 1e-6
        assert rel(result["grad"], result["ref_grad"]) <= 1e-5


@pytest.mark.multiproc
@pytest.mark.parametrize("family", FAMILIES)
def test_every_megatron_key_matches_one_table_row(matrix, family):
    """The state dict of a real megatron-core ``GPTModel`` (embedding, layers, final norm, head): each key
    is a Transformer Engine ``_extra_state`` or matches exactly one row of the tensor table, and every row
    of the table is met."""
    from adapter.weights.mcore import local_spec_name, mcore_table

    model = workers.tiny_config(family)[0].model
    table = mcore_table(model)
    keys = [k for k in matrix[(family, "reference")]["mcore_keys"] if local_spec_name(k) is not None]
    rows = table.embedding + table.layer + table.final
    assert all(sum(_matches(row, k) for row in rows) == 1 for k in keys), keys
    assert all(any(_matches(row, k) for k in keys) for row in rows)
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in keys  # megatron-core's literal names
    assert "decoder.layers.5.mlp.linear_fc1.weight" in keys and "output_layer.weight" in keys


def _matches(row, key: str) -> bool:
    head, _, tail = row.name.partition("{i}")
    middle = key[len(head):len(key) - len(tail)] if tail else key[len(head):]
    return key.startswith(head) and key.endswith(tail) and (middle.isdigit() if "{i}" in row.name else key == row.name)
