"""Turn a loaded InternEvo config into ``schema.InternLMConfig``.

This is InternEvo 0.5.2's ``args_sanity_check`` (``initialize/launch.py``) rewritten as a pure function, driven
by the field table: every row of ``fields.FIELDS`` is read as its kind says, with InternEvo's default when the
key is absent, into the typed attribute it names. What a row cannot say is written out here: the variant
spellings (``spellings.py``), which keys a model family's builder takes, the dtype strings, the MLP width, and
the rules that tie fields together (checkpoint saving, gradient accumulation, loss-scale bounds ...). Each
problem raises ``ConfigError`` naming the dotted field and the file:line where it is written. Unknown keys are
refused with a did-you-mean, because a misspelt key silently falls back to a default in InternEvo.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from adapter.config import fields, sizes, spellings
from adapter.config.load import RawConfig
from adapter.config.reader import MISSING, Reader, suggest
from adapter.config.schema import MODEL_TYPES, InternLMConfig, ModelConfig


def ffn_hidden_size(hidden_size: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    """InternEvo's FeedForward width: ``multiple_of * ceil(int(H * mlp_ratio) / multiple_of)``.

    >>> ffn_hidden_size(4096, 8 / 3), ffn_hidden_size(6144, 8 / 3), ffn_hidden_size(4096, 3.5)
    (11008, 16384, 14336)
    """
    return multiple_of * math.ceil(int(hidden_size * mlp_ratio) / multiple_of)


def normalize(raw: RawConfig) -> InternLMConfig:
    """Normalise a loaded config. Raises ``ConfigError`` on the first problem found."""
    _check_known_keys(raw)
    r = Reader(raw)
    for name in fields.SECTIONS:
        value = r.lookup(name)
        if value is MISSING or value is None:
            if name in fields.REQUIRED_SECTIONS:
                raise r.error(name, f"the `{name}` section is required")
        elif not isinstance(value, dict):
            raise r.error(name, f"must be a dict, got {type(value).__name__} {value!r}")
    _family(r)
    _check_family_keys(r)
    r.spelled = spellings.canonical(r)
    values = _read_all(r, fields.FIELDS)
    _model(r, values)
    _parallel(r, values)
    _data(r, values)
    _grad_scaler(r, values)
    _ckpt(r, values)
    cfg = _build(InternLMConfig, values, "", source=raw.source, given=_given(raw), defaulted=r.defaulted,
                 lines=raw.lines)
    sizes.check_model(cfg.model, r.error)
    sizes.check_data(cfg.model, cfg.data, r.error)
    return cfg


def normalize_model(model_type: str, model: dict[str, Any], source: str) -> ModelConfig:
    """Just the ``model`` section (as InternEvo stores it in ``model_config.pt``, dtype object included)."""
    values = dict(model)
    if not isinstance(values.get("dtype", ""), str):
        values["dtype"] = str(values["dtype"])  # torch.bfloat16 -> "torch.bfloat16"
    r = Reader(RawConfig({"model_type": model_type, "model": values}, source, {}))
    _family(r)
    r.spelled = spellings.canonical(r)
    out = _read_all(r, [f for f in fields.FIELDS if f.path.startswith("model.") or (f.into or "").startswith("model.")])
    _model(r, out)
    model = _build(ModelConfig, out, "model.")
    sizes.check_model(model, r.error)
    return model


def _read_all(r: Reader, rows) -> dict[str, Any]:
    """The loop: every readable row's normalised value, keyed by the typed attribute it fills."""
    values = {}
    for f in rows:
        if f.kind is not None:
            value = r.value(f.path)
            if f.into:
                values[f.into] = value
    return values


def _build(cls, values: dict[str, Any], prefix: str, **extra):
    """``cls`` from the ``prefix``-ed entries of ``values``; dataclass-typed fields are built the same way."""
    hints = typing.get_type_hints(cls)
    kwargs = dict(extra)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, f"{prefix}{f.name}.")
        elif f"{prefix}{f.name}" in values:
            kwargs[f.name] = values[f"{prefix}{f.name}"]
    return cls(**kwargs)


def _given(raw: RawConfig) -> dict[str, Any]:
    """Every leaf the file writes under a known key, dicts of free-form keys expanded, in the file's order."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if not fields.is_known(path) and not fields.is_free_form(path):
                continue  # ALL-CAPS helper variables
            if isinstance(value, dict) and (fields.has_children(path) or fields.is_free_form(path)):
                if value:
                    walk(value, path + ".")
                elif fields.is_free_form(path):  # ``monitor = dict()``; an empty section writes nothing
                    out[path] = value
            elif path in fields.BY_PATH or fields.is_free_form(path):  # not a ``None`` section
                out[path] = value

    walk(raw.values, "")
    return out


def _check_known_keys(raw: RawConfig) -> None:
    """Refuse keys InternEvo does not know; ALL-CAPS top-level names are helper variables."""

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if not prefix and (key.isupper() or key.startswith("_")) and key not in fields.TOP_LEVEL_KEYS:
                continue
            if not isinstance(key, str):
                raise raw.error(prefix.rstrip("."), f"keys must be strings, got {key!r}")
            if fields.is_free_form(path):
                continue
            if not fields.is_known(path):
                siblings = fields.known_children(prefix.rstrip("."))
                raise raw.error(path, f"unknown key `{key}`{suggest(key, siblings)}")
            if isinstance(value, dict) and fields.has_children(path):
                walk(value, path + ".")

    walk(raw.values, "")


def _family(r: Reader) -> None:
    model_type = r.value("model_type")
    if model_type not in MODEL_TYPES:
        raise r.error("model_type", f"unsupported model_type {model_type!r}; supported: "
                      f"{', '.join(MODEL_TYPES)}{suggest(model_type, MODEL_TYPES)}")
    r.family = MODEL_TYPES[model_type]


def _check_family_keys(r: Reader) -> None:
    """Refuse model keys the family's InternEvo builder does not take: InternEvo itself would stop there."""
    for f in fields.FIELDS:
        if not f.takes(r.family) and r.lookup(f.path) is not MISSING:
            model_type = r.value("model_type")
            raise r.error(f.path, f.why_not or (
                f"model_type {model_type!r} does not take `{f.path.split('.')[-1]}`: InternEvo 0.5.2's "
                f"{fields.BUILDERS[r.family]} has no such argument, so InternEvo itself would stop with a "
                "TypeError; remove the key"))


def _model(r: Reader, v: dict[str, Any]) -> None:
    """Family, dtype (one key, two attributes), MLP width and the bias rule, which no single row can say."""
    v["model.family"] = r.family
    v["model.dtype"], v["model.tf32"] = r.value("model.dtype")
    hidden, mlp_ratio = v["model.hidden_size"], v["model.mlp_ratio"]
    sizes.check_ffn_product(hidden, mlp_ratio, r.error)
    if int(hidden * mlp_ratio) < 1:
        raise r.error("model.mlp_ratio", f"gives an empty MLP (hidden_size {hidden} × {mlp_ratio})")
    v["model.ffn_hidden_size"] = ffn_hidden_size(hidden, mlp_ratio, v["model.multiple_of"])
    if r.family == "internlm1" and r.lookup("model.no_bias") is not MISSING and v["model.no_bias"]:
        raise r.error("model.no_bias", "InternLM1 always has qkv and output-projection biases; no_bias=True "
                      "is only meaningful for InternLM2 and LLAMA2")


def _parallel(r: Reader, v: dict[str, Any]) -> None:
    v["parallel.sequence_parallel"] = v["parallel.tensor_mode"] in ("msp", "fsp", "isp")
    if v["parallel.weight_size"] > 1 and v["parallel.tensor_mode"] != "isp":
        raise r.error("parallel.weight.size", f"weight parallel ({v['parallel.weight_size']}) is only supported "
                      "with tensor mode 'isp'")
    if v["parallel.fsdp"] and v["parallel.pipeline_size"] > 1:
        raise r.error("parallel.zero1.fsdp", "FSDP is not supported with pipeline size > 1 (InternEvo refuses it too)")


def _data(r: Reader, v: dict[str, Any]) -> None:
    micro_num, grad_acc = v["data.micro_num"], v["data.gradient_accumulation"]
    if v["parallel.pipeline_size"] == 1 and grad_acc != micro_num:
        raise r.error("data.gradient_accumulation",
                      f"must equal data.micro_num ({micro_num}) without pipeline parallelism, got {grad_acc}")


def _grad_scaler(r: Reader, v: dict[str, Any]) -> None:
    low, initial, high = v["grad_scaler.min_scale"], v["grad_scaler.initial_scale"], v["grad_scaler.max_scale"]
    if low > initial or initial > high:
        raise r.error("grad_scaler.fp16.initial_scale",
                      f"must lie between min_scale ({low:g}) and max_scale ({high:g}), got {initial:g}")


def _ckpt(r: Reader, v: dict[str, Any]) -> None:
    """InternEvo's checkpoint rules, applied to the already type-checked ``ckpt`` keys."""
    enable, save = v["ckpt.enable_save_ckpt"], v["ckpt.save_ckpt_folder"]
    if enable and v["ckpt.checkpoint_every"] is None:
        raise r.error("ckpt.checkpoint_every", "is required when ckpt.enable_save_ckpt is True")
    if enable and not save:
        raise r.error("ckpt.save_ckpt_folder", "is required when ckpt.enable_save_ckpt is True")
    # InternEvo: "Storing ckpt on file system does not support asynchronous storage, will use sync save!"
    async_upload = v["ckpt.async_upload"] and enable and save.startswith(("boto3:", "volc:", "oss2:", "s3://"))
    snapshot = v["ckpt.snapshot_ckpt_folder"]
    if snapshot is None and save:
        snapshot = save.rstrip("/") + "/snapshot"
    load_info = v["ckpt.load_ckpt_info"]
    if load_info is not None:
        if not isinstance(load_info, dict) or not isinstance(load_info.get("path"), str):
            raise r.error("ckpt.load_ckpt_info", "must be dict(path=..., content=(...), ckpt_type=...)")
        ckpt_type = load_info.get("ckpt_type", "internevo")
        if ckpt_type not in ("internevo", "llama", "hf_llama", "internlm_test"):
            raise r.error("ckpt.load_ckpt_info.ckpt_type", f"unknown ckpt_type {ckpt_type!r}; InternEvo knows "
                          "'internevo', 'llama', 'hf_llama', 'internlm_test'")
    freq = v["ckpt.oss_snapshot_freq"]
    v.update({
        "ckpt.save_ckpt_folder": save if enable else None,
        "ckpt.checkpoint_every": v["ckpt.checkpoint_every"] if enable else None,
        "ckpt.async_upload": bool(async_upload),
        "ckpt.async_upload_tmp_folder": v["ckpt.async_upload_tmp_folder"] if async_upload else None,
        "ckpt.snapshot_ckpt_folder": snapshot if enable else None,
        # InternEvo snapshots only when oss_snapshot_freq > 1
        "ckpt.oss_snapshot_freq": freq if enable and freq is not None and freq > 1 else None,
    })
