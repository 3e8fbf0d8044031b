"""Every target the field table claims is where the translators really put the value.

For each row of ``fields.FIELDS`` with a verbatim target (``ds:``, ``mcore:``, ``model:`` or ``args:``), a config
that moves the key off its default is rendered, and the output at that target must equal the normalised value
(which, for a plain number or switch, must equal what the config wrote). Two configs cover the rows: one with
the dict spellings and fp16 (so the loss-scaler targets exist), one with the short spellings in fp32.
"""

from __future__ import annotations

import operator

import pytest
import yaml

from adapter.config import RawConfig, fields, normalize, validate
from adapter.config.convert import render
from tests.config.test_translation_agreement import parse_args
from tests.conftest import base_sections

DICT_FORMS = {
    "model_type": "INTERNLM2_PUBLIC", "model.num_layers": 6, "model.hidden_size": 128,
    "model.num_attention_heads": 8, "model.num_kv_attention_heads": 2, "model.vocab_size": 256,
    "model.mlp_ratio": 3.5, "model.multiple_of": 64, "model.layer_norm_epsilon": 1e-6, "model.checkpoint": 0.5,
    "model.rope_base": 5e5, "model.qk_interleaved": True, "model.no_bias": True, "model.parallel_output": False,
    "model.drop_rate": 0.1, "model.attn_drop_rate": 0.05, "model.residual_in_fp32": True,
    "model.dtype": "torch.float16",
    "parallel.tensor": dict(size=2, mode="msp"), "parallel.tensor.size": 2,
    "parallel.pipeline": dict(size=2, interleaved_overlap=False), "parallel.pipeline.size": 2,
    "data.seq_len": 32, "data.micro_bsz": 3, "data.total_steps": 20, "data.seed": 7,
    "adam.lr": 3e-4, "adam.adam_beta1": 0.8, "adam.adam_beta2": 0.9, "adam.adam_eps": 1e-6, "adam.weight_decay": 0.05,
    "lr_scheduler.total_steps": 15, "lr_scheduler.eta_min": 2e-5, "lr_scheduler.last_epoch": 3,
    "grad_scaler.fp16.initial_scale": 1024.0, "grad_scaler.fp16.min_scale": 2.0,
    "grad_scaler.fp16.growth_interval": 50, "grad_scaler.hysteresis": 3,
    "hybrid_zero_optimizer.reduce_bucket_size": 4096, "hybrid_zero_optimizer.clip_grad_norm": 0.5,
}
SHORT_FORMS = {
    "model_type": "INTERNLM2_PUBLIC", "model.num_kv_attention_heads": 2, "model.adapt_hf": False,
    "parallel.tensor": 2, "parallel.pipeline": 2, "beta2_scheduler.init_beta2": 0.97,
    "hybrid_zero_optimizer.clip_grad_norm": 0.5, "adapter.clip_grad_in_fp32": True,
}
CASES = {"dict_forms": DICT_FORMS, "short_forms": SHORT_FORMS}
#: Written keys that only set up a case (a sub-key carries the sample, or the row has no verbatim target).
SETUP = {"parallel.tensor.size", "parallel.pipeline.size", "model.dtype"}


def _config(samples: dict):
    s = base_sections()
    for path, value in samples.items():
        if path in SETUP:
            continue
        node = s
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    s["model"]["dtype"] = samples.get("model.dtype", "torch.float32")
    cfg = normalize(RawConfig(s, "targets.py", {}))
    return cfg, validate(cfg, 4)


def _outputs(cfg, layout) -> dict:
    import json

    files = render(cfg, layout)
    mcore = yaml.safe_load(files["transformer_config.yaml"])
    return {"ds": json.loads(files["ds_config.json"]), "mcore": mcore["transformer_config"], "model": mcore["model"],
            "args": parse_args(files["megatron_args.txt"])}


def _at(outputs: dict, target: fields.Target, *, missing_ok: bool = False):
    """The output at ``target``; an args switch that is absent reads ``None``."""
    if target.where == "args":
        return outputs["args"].get(target.key)
    node = outputs[target.where]
    for part in target.key.split(".") if target.where == "ds" else [target.key]:
        if missing_ok and part not in node and not isinstance(node, list):
            return None  # the base config has no such section (fp16 keys in an fp32 run)
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _carries(actual, expected) -> bool:
    if isinstance(expected, bool):
        return bool(actual) == expected  # an args switch reads True when present, None when absent
    if isinstance(actual, str) and not isinstance(expected, str):
        return float(actual) == expected
    return actual == expected


def _verbatim_rows():
    return [f for f in fields.FIELDS if any(t.verbatim for t in f.to)]


def test_every_verbatim_target_is_exercised():
    sampled = set(DICT_FORMS) | set(SHORT_FORMS)
    missing = [f.path for f in _verbatim_rows() if f.path not in sampled]
    assert not missing, f"add a non-default sample for {missing}"


def test_every_attribute_the_table_names_exists():
    cfg, _ = _config(DICT_FORMS)
    for f in fields.FIELDS:
        for attr in [f.into] + [t.attr for t in f.to]:
            if attr:
                operator.attrgetter(attr)(cfg)  # raises AttributeError for a misspelt attribute


@pytest.mark.parametrize("case", sorted(CASES))
def test_targets_carry_the_normalised_value(case):
    samples = CASES[case]
    cfg, layout = _config(samples)
    base, base_layout = _config({})
    out, base_out = _outputs(cfg, layout), _outputs(base, base_layout)
    checked = 0
    for path in samples:
        row = fields.BY_PATH[path]
        for target in (t for t in row.to if t.verbatim):
            attr = target.attr or row.into
            expected = operator.attrgetter(attr)(cfg)
            if target.attr is None and row.kind in ("int", "float", "bool", "ratio"):
                assert expected == samples[path], (path, expected)
            actual = _at(out, target)
            assert _carries(actual, expected), f"{path}: {target.describe()} holds {actual!r}, not {expected!r}"
            moved = not _carries(_at(base_out, target, missing_ok=True), expected)
            assert moved, f"{path}: {target.describe()} holds the base config's value too"
            checked += 1
    assert checked >= 8
