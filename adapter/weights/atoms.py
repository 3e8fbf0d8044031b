"""The model's atoms: the tensors every format agrees on, with their shapes and when they exist.

Formats differ in how they *store* atoms (fused, split, named), never in the atoms themselves: a
decoder-only transformer with pre-norm attention (q, k, v, o), a SwiGLU MLP (gate, up, down), an embedding,
a final norm and an output head. q, k and v rows are head-major (``(head, head_dim)``), k and v with
``num_kv_attention_heads`` heads; ``gate`` is the SiLU side, ``down`` the output (InternEvo's ``w1``,
``w3``, ``w2``).

A model is read and written one *unit* at a time: unit 0 is the embedding, unit ``1 + i`` is layer ``i``,
and unit ``L + 1`` is the final norm with the head.
"""

from __future__ import annotations

from typing import Optional

from adapter.config.schema import ModelConfig

#: Atoms outside the layers, by unit (first or last).
EMBEDDING = ("embedding",)
FINAL = ("final_norm.weight", "final_norm.bias", "head")
#: Atoms of every layer, in no particular order (each format has its own).
LAYER = ("q.weight", "k.weight", "v.weight", "q.bias", "k.bias", "v.bias", "o.weight", "o.bias",
         "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "gate", "up", "down")


def present(model: ModelConfig, atom: str) -> bool:
    """Whether the model has this atom (biases depend on the family and config, norm biases on the norm)."""
    if atom in ("q.bias", "k.bias", "v.bias"):
        return model.qkv_bias
    if atom == "o.bias":
        return model.out_proj_bias
    if atom.endswith("norm1.bias") or atom.endswith("norm2.bias") or atom == "final_norm.bias":
        return model.norm_type == "layernorm"
    return True


def shape(model: ModelConfig, atom: str) -> tuple[int, ...]:
    """The atom's whole (tensor-parallel size 1) shape."""
    h, f, v, d = model.hidden_size, model.ffn_hidden_size, model.vocab_size, model.head_dim
    q, kv = model.num_attention_heads * d, model.num_kv_attention_heads * d
    return {"embedding": (v, h), "head": (v, h), "q.weight": (q, h), "k.weight": (kv, h), "v.weight": (kv, h),
            "q.bias": (q,), "k.bias": (kv,), "v.bias": (kv,), "o.weight": (h, q), "gate": (f, h), "up": (f, h),
            "down": (h, f)}.get(atom, (h,))


def rows(model: ModelConfig, atoms: tuple[str, ...]) -> tuple[int, ...]:
    """The row counts of ``atoms`` (what a fused ``Stored`` needs)."""
    return tuple(shape(model, a)[0] for a in atoms)


def unit_of(model: ModelConfig, atom: str, layer: Optional[int]) -> int:
    """The unit an atom belongs to: 0 embedding, ``1 + layer``, ``L + 1`` final norm and head."""
    if layer is not None:
        return 1 + layer
    return 0 if atom in EMBEDDING else model.num_layers + 1


def num_units(model: ModelConfig) -> int:
    return model.num_layers + 2
