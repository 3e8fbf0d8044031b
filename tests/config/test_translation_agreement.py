"""The translators agree with each other: ``megatron_args.txt`` describes the same model as ``transformer_config.yaml``.

Megatron-LM's ``core_transformer_config_from_args`` fills every ``TransformerConfig`` field from the argument of
the same name (``--hidden-dropout`` → ``hidden_dropout``), with a few renames; an argument left out takes
Megatron-LM's own default, which is not InternEvo's (both dropouts default to 0.1 there). So every setting the
two files share must carry the same value, and the settings where Megatron-LM's default differs from the
translation must be written out.
"""

from __future__ import annotations

import pytest
import yaml

from adapter.config import RawConfig, normalize, read_config, validate
from adapter.config.convert import render
from tests.conftest import CONFIGS, base_sections

#: Megatron-LM arguments whose ``TransformerConfig`` field has another name (arguments.py, ``--norm-epsilon`` ...).
RENAMED = {"--norm-epsilon": "layernorm_epsilon", "--swiglu": "gated_linear_unit",
           "--disable-bias-linear": "add_bias_linear", "--overlap-p2p-communication": "overlap_p2p_comm",
           "--no-overlap-p2p-communication": "overlap_p2p_comm"}
#: ``store_false`` switches: present means False.
NEGATIVE = {"--disable-bias-linear", "--no-overlap-p2p-communication"}
#: Arguments that feed the model builder rather than ``TransformerConfig`` (ModelOptions in the yaml).
MODEL_OPTIONS = {"--rotary-base": "rotary_base", "--vocab-size": "vocab_size", "--seq-length": "max_sequence_length",
                 "--position-embedding-type": "position_embedding_type"}
#: ``TransformerConfig`` fields whose Megatron-LM default is not what InternEvo configs mean, so the arguments
#: must say them: (switch or valued argument, Megatron-LM's default when it is absent).
MUST_BE_WRITTEN = {"hidden_dropout": 0.1, "attention_dropout": 0.1, "fp32_residual_connection": False,
                   "add_qkv_bias": False, "rotary_interleaved": False, "sequence_parallel": False,
                   "bf16": False, "fp16": False, "add_bias_linear": True, "gated_linear_unit": False}


def parse_args(text: str) -> dict[str, str | bool]:
    """``--flag value`` lines → {flag: value}; a bare ``--flag`` → True. ``#`` lines are comments."""
    out: dict[str, str | bool] = {}
    for line in text.splitlines():
        if line.startswith("--"):
            flag, _, value = line.partition(" ")
            out[flag] = value or True
    return out


def _field(flag: str) -> str:
    return RENAMED.get(flag, flag[2:].replace("-", "_"))


def _same(arg: str | bool, value) -> bool:
    if isinstance(value, bool):
        return arg is True
    if isinstance(value, (int, float)):
        return float(arg) == value
    return arg == value


def _outputs(cfg, layout) -> tuple[dict, dict, dict]:
    files = render(cfg, layout)
    mcore = yaml.safe_load(files["transformer_config.yaml"])
    return parse_args(files["megatron_args.txt"]), mcore["transformer_config"], mcore["model"]


def _nondefault():
    """A config that moves every model setting off its default (dropout, fp32 residual, GQA, fp16 ...)."""
    s = base_sections()
    s["model_type"] = "INTERNLM2_PUBLIC"
    s["model"].update(num_kv_attention_heads=2, drop_rate=0.1, attn_drop_rate=0.05, residual_in_fp32=True,
                      dtype="torch.float16", qk_interleaved=True, layer_norm_epsilon=1e-6, rope_base=5e5,
                      checkpoint=0.5, norm_type="layernorm")
    s["parallel"]["tensor"] = dict(size=2, mode="msp")
    cfg = normalize(RawConfig(s, "nondefault.py", {}))
    return cfg, validate(cfg, 2)


CASES = {name: (lambda name=name: read_config(CONFIGS / f"{name}.py", world_size=64))
         for name in ("7B_demo", "internlm2_7B")}
CASES["nondefault"] = _nondefault


@pytest.mark.parametrize("case", sorted(CASES))
def test_megatron_args_agree_with_transformer_config(case):
    args, tc, model = _outputs(*CASES[case]())
    compared = set()
    for flag, arg in args.items():
        field = _field(flag)
        if flag in MODEL_OPTIONS:
            assert _same(arg, model[MODEL_OPTIONS[flag]]), (flag, arg, model[MODEL_OPTIONS[flag]])
        elif field in tc:
            expected = not tc[field] if flag in NEGATIVE else tc[field]
            assert _same(arg, expected), f"{flag} {arg} but transformer_config.yaml has {field}={tc[field]}"
            compared.add(field)
    if "--group-query-attention" not in args:  # Megatron-LM: num_query_groups = num_attention_heads
        assert tc["num_query_groups"] == tc["num_attention_heads"]
    for field, megatron_default in MUST_BE_WRITTEN.items():
        if field not in compared:
            assert tc[field] == megatron_default, f"{field}={tc[field]} needs an argument (Megatron-LM's default is "\
                                                  f"{megatron_default})"
    assert {"hidden_dropout", "attention_dropout", "num_layers", "ffn_hidden_size", "layernorm_epsilon"} <= compared


def test_dropout_and_fp32_residual_reach_both_outputs():
    args, tc, _ = _outputs(*_nondefault())
    assert (tc["hidden_dropout"], tc["attention_dropout"], tc["fp32_residual_connection"]) == (0.1, 0.05, True)
    assert (args["--hidden-dropout"], args["--attention-dropout"]) == ("0.1", "0.05")
    assert args["--fp32-residual-connection"] is True
