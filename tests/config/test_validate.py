"""Cross-field validation: one bad config per rule, each error naming the field and its line."""

from __future__ import annotations

import pytest

from adapter.config import ConfigError, read_config
from adapter.runtime.layout import partition_uniform
from tests.conftest import base_sections


def _with(**changes):
    s = base_sections()
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        s[section][key] = value
    return s


@pytest.mark.parametrize("sections, world, field, message", [
    (_with(model__hidden_size=66), None, "model.hidden_size", "66 is not divisible by model.num_attention_heads"),
    (dict(_with(model__num_kv_attention_heads=3), model_type="INTERNLM2_PUBLIC"), None,
     "model.num_kv_attention_heads", "must be a multiple of num_kv_attention_heads \\(3\\)"),
    (_with(parallel__tensor=dict(size=8)), None, "parallel.tensor.size", "tensor size 8 must divide num_attention_heads"),
    (dict(_with(model__num_kv_attention_heads=2, parallel__tensor=4), model_type="INTERNLM2_PUBLIC"), None,
     "parallel.tensor", "tensor size 4 must divide num_kv_attention_heads \\(2\\)"),
    (_with(model__vocab_size=127, parallel__tensor=2), None, "model.vocab_size", "127 is not divisible by tensor size 2"),
    (_with(model__num_chunks=3), None, "model.num_chunks", "3 virtual chunks need pipeline parallelism"),
    (_with(model__num_chunks=2, parallel__pipeline=dict(size=2, interleaved_overlap=False)), None,
     "parallel.pipeline.interleaved_overlap", "requires parallel.pipeline = dict\\(size=..., interleaved_overlap=True\\)"),
    (_with(model__num_chunks=3, parallel__pipeline=dict(size=2, interleaved_overlap=True)), None,
     "model.num_layers", "4 layers cannot be cut into 3 equal chunks"),
    (_with(parallel__pipeline=5), None, "model.num_layers", "leaves some stage without a layer"),
    (_with(model__num_chunks=2, data__micro_num=3, parallel__pipeline=dict(size=2, interleaved_overlap=True)), None,
     "data.micro_num", "3 micro-batches must be a multiple of the pipeline size \\(2\\)"),
    (_with(data__rampup_batch_size="3 2 4", parallel__pipeline=2), None, "data.rampup_batch_size",
     "must be multiples of micro_bsz \\(2\\)"),
    (_with(data__seq_len=15, data__micro_bsz=1, parallel__tensor=dict(size=2, mode="msp")), None, "data.seq_len",
     "15 tokens .* over tensor size 2"),
    (_with(parallel__tensor=dict(size=2, mode="isp")), None, "parallel.tensor.mode", "'isp' .* has no megatron-core"),
    (_with(model__use_swiglu=False), None, "model.use_swiglu", "only the SwiGLU MLP"),
    (_with(model__is_reward=True), None, "model.is_reward", "reward-model heads"),
    (_with(parallel__pipeline=2), 3, "world_size", "3 processes cannot be split into tensor \\(1\\) × pipeline \\(2\\)"),
    (_with(parallel__zero1=4), 6, "parallel.zero1", "zero1=4 must divide the data-parallel size 6"),
    (_with(parallel__zero1=dict(size=8)), 4, "parallel.zero1.size", "zero1=8 must divide the data-parallel size 4"),
])
def test_each_rule(make_config, sections, world, field, message):
    path = make_config(sections)
    with pytest.raises(ConfigError, match=message) as info:
        read_config(path, world_size=world)
    err = info.value
    assert err.field == field
    if field != "world_size":
        section = field.split(".")[0]
        assert err.source == str(path) and err.line == list(sections).index(section) + 1, str(err)


def test_valid_layouts(make_config):
    cfg, layout = read_config(make_config(_with(model__num_chunks=2, model__num_layers=6,
                                                parallel__pipeline=dict(size=2, interleaved_overlap=True))),
                              world_size=8)
    assert (layout.tp, layout.pp, layout.vpp, layout.dp, layout.zero1) == (1, 2, 2, 4, 4)
    assert layout.stages == (((0, 1), (3, 4)), ((1, 3), (4, 6)))
    assert not layout.even and layout.world_size == 8
    cfg, layout = read_config(make_config(_with(parallel__tensor=dict(size=2, mode="msp"), parallel__zero1=2)),
                              world_size=8)
    assert layout.sequence_parallel and layout.dp == 4 and layout.zero1 == 2
    # sequence parallelism with tensor size 1 is a no-op, as in megatron-core
    cfg, layout = read_config(make_config(_with(parallel__tensor=dict(size=1, mode="msp"))))
    assert cfg.parallel.sequence_parallel and not layout.sequence_parallel


def test_partition_uniform_matches_internevo():
    # examples printed by InternEvo's own partition_uniform (INTERNEVO_FORMAT.md §4)
    assert partition_uniform(32, 4, 1) == [[(0, 8)], [(8, 16)], [(16, 24)], [(24, 32)]]
    assert partition_uniform(30, 4, 1) == [[(0, 7)], [(7, 14)], [(14, 22)], [(22, 30)]]
    assert partition_uniform(6, 4, 1) == [[(0, 1)], [(1, 2)], [(2, 4)], [(4, 6)]]
    assert partition_uniform(32, 4, 2) == [[(0, 4), (16, 20)], [(4, 8), (20, 24)], [(8, 12), (24, 28)],
                                           [(12, 16), (28, 32)]]
    assert partition_uniform(12, 2, 3) == [[(0, 2), (4, 6), (8, 10)], [(2, 4), (6, 8), (10, 12)]]
    assert partition_uniform(6, 2, 2) == [[(0, 1), (3, 4)], [(1, 3), (4, 6)]]
