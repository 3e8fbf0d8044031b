"""Sizes no run can have: refused when the config is read, not when the first tensor is made.

Each field is a valid integer on its own, yet ``num_layers=10**18`` or ``hidden_size=2**40`` describe a
model that cannot exist. Three bounds, each tied to what would break:

* ``MAX_BYTES`` (2^63 - 1): the most bytes a tensor, a file or an offset can hold (torch and numpy sizes and
  ``off_t`` are signed 64-bit). The model's fp32 weights (what training keeps as master weights and the widest
  dtype the tools write), and each micro-batch's largest activation (``micro_bsz * seq_len`` rows of the
  widest of hidden, MLP and vocabulary columns, fp32) and a step's token ids (int64) must fit in it.
  Every tensor is smaller than these, so no shape overflows either.
* ``MAX_LAYERS`` (``bounds.MAX_SIZE``, a million): each layer is a module, a row of the pipeline layout the
  translator writes and a unit of every checkpoint format, so the layer count is the length of values the
  tools build; it gets the same bound as any value a config may evaluate to (the deepest published models have
  about a hundred layers).
* every integer field fits a signed 64-bit integer (checked by the reader), as torch, numpy, DeepSpeed's JSON
  and Megatron-LM's arguments read them.

Messages give the sizes in powers of two and never quote an unbounded value.
"""

from __future__ import annotations

import math
from typing import Callable

from adapter.config.bounds import MAX_SIZE
from adapter.config.errors import ConfigError
from adapter.config.schema import DataConfig, ModelConfig

MAX_BYTES = 2**63 - 1
MAX_LAYERS = MAX_SIZE
FP32, INT64 = 4, 8

Error = Callable[[str, str], ConfigError]


def magnitude(n: int) -> str:
    """``n`` for a message: as written below a trillion, else ``about 2^k``."""
    return f"{n:,}" if n < 10**12 else f"about 2^{n.bit_length() - 1}"


def parameter_count(m: ModelConfig) -> tuple[int, int]:
    """``(per layer, outside the layers)``: the embedding, final norm and head count as outside."""
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_kv_attention_heads * d
    norm = h * (2 if m.norm_type == "layernorm" else 1)
    bias = (q + 2 * kv + h) if m.qkv_bias else 0
    layer = (q + 2 * kv) * h + h * q + 3 * f * h + 2 * norm + bias
    return layer, 2 * m.vocab_size * h + norm


def check_model(m: ModelConfig, error: Error) -> None:
    """Refuse a model whose layers or weights cannot exist (see the module docstring)."""
    if m.num_layers > MAX_LAYERS:
        raise error("model.num_layers", f"{magnitude(m.num_layers)} layers: at most {MAX_LAYERS:,} (each layer is "
                    "a module, a pipeline-layout row and a checkpoint unit; the deepest real models have ~100)")
    layer, outside = parameter_count(m)
    total = m.num_layers * layer + outside
    if total * FP32 > MAX_BYTES:
        name = _culprit(m, layer, outside)
        raise error(name, f"makes a model of {magnitude(total)} parameters ({magnitude(total * FP32)} bytes in "
                    "fp32): past 2^63 bytes, the most a tensor or a file can hold (hidden "
                    f"{magnitude(m.hidden_size)}, MLP {magnitude(m.ffn_hidden_size)}, vocabulary "
                    f"{magnitude(m.vocab_size)}, {magnitude(m.num_layers)} layers)")
    rope = m.max_position_embeddings * m.head_dim * FP32
    if rope > MAX_BYTES:
        raise error("model.max_position_embeddings", f"{magnitude(m.max_position_embeddings)} positions make a "
                    f"rotary table of {magnitude(rope)} bytes: past 2^63 bytes, the most a tensor can hold")


def _culprit(m: ModelConfig, layer: int, outside: int) -> str:
    """The field to name for too many parameters: the width that makes one tensor too big, else the depth."""
    too_big = lambda params: params * FP32 > MAX_BYTES  # noqa: E731
    h = m.hidden_size
    if too_big(4 * h * h):
        return "model.hidden_size"
    if too_big(layer):
        return "model.mlp_ratio"
    if too_big(outside):
        return "model.vocab_size" if m.vocab_size >= h else "model.hidden_size"
    return "model.num_layers" if m.num_layers * layer > outside else "model.vocab_size"


def check_ffn_product(hidden: int, mlp_ratio: float, error: Error) -> None:
    """``hidden_size * mlp_ratio`` must be a finite number before InternEvo's rule turns it into an int."""
    if not math.isfinite(hidden * mlp_ratio):
        raise error("model.mlp_ratio", f"hidden_size × mlp_ratio ({mlp_ratio:g}) overflows a float")


def check_data(m: ModelConfig, d: DataConfig, error: Error) -> None:
    """Refuse micro-batches whose activations or whose step's token ids cannot be one tensor."""
    rows = d.packed_length
    width, wide = max((m.hidden_size, "hidden states"), (m.ffn_hidden_size, "MLP activations"),
                      (m.vocab_size, "logits"))
    if rows * width * FP32 > MAX_BYTES:
        field = "data.seq_len" if d.seq_len >= d.micro_bsz else "data.micro_bsz"
        raise error(field, f"micro-batches of {magnitude(rows)} tokens (seq_len × micro_bsz) make {wide} of "
                    f"{magnitude(rows)} × {magnitude(width)} in fp32, {magnitude(rows * width * FP32)} bytes: past "
                    "2^63 bytes, the most a tensor can hold")
    for field, count in (("data.micro_num", d.micro_num), ("data.valid_micro_num", d.valid_micro_num),
                         ("data.gradient_accumulation", d.gradient_accumulation)):
        if count * rows * INT64 > MAX_BYTES:
            raise error(field, f"{magnitude(count)} micro-batches of {magnitude(rows)} tokens make a batch of "
                        f"{magnitude(count * rows * INT64)} bytes of token ids: past 2^63 bytes, the most a tensor "
                        "can hold")
