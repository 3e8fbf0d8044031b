"""The fidelity report: every field the user wrote, and where it went (torch-free).

Each given leaf is judged by its row in ``fields.FIELDS``: ``exact``, ``approximate`` (how) or
``unsupported`` (why, and what is lost). A training field (optimizer, schedules, data, precision) is
``exact`` only where InternEvo's own runs exercise it with that value (``fields.CHECKED_BY_INTERNEVO_RUNS``).
Defaults InternEvo would fill in are listed separately, so a reader can see the values a run really uses.
The same data is rendered as JSON (for tools) and Markdown (for people).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from adapter.config import fields
from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout

STATUSES = ("exact", "approximate", "unsupported")


@dataclass(frozen=True)
class FieldReport:
    path: str
    value: Any
    status: str
    target: str
    note: str


def field_reports(cfg: InternLMConfig) -> list[FieldReport]:
    """One entry per given leaf, in the order the file wrote them."""
    out = []
    for path, value in cfg.given.items():
        rule = fields.field_for(path)
        if rule is None:  # normalize() refuses unknown keys, so this is a table bug
            raise KeyError(f"no fidelity rule for {path}")
        status, note = rule.status, rule.note
        if rule.judge is not None:
            verdict = rule.judge(cfg, value)
            if verdict is not None:
                status, note = verdict
        if status == "exact" and fields.is_training(path) and not fields.checked_by_internevo_runs(cfg, path, value):
            status, note = "approximate", f"{note}; {fields.UNCHECKED_NOTE}" if note else fields.UNCHECKED_NOTE
        out.append(FieldReport(path, _jsonable(value), status, rule.target, note))
    return out


def report_dict(cfg: InternLMConfig, layout: ParallelLayout) -> dict[str, Any]:
    entries = field_reports(cfg)
    return {
        "source": cfg.source,
        "family": cfg.model.family,
        "layout": {
            "tensor": layout.tp,
            "pipeline": layout.pp,
            "virtual_pipeline": layout.vpp,
            "data": layout.dp,
            "world_size": layout.world_size,
            "zero1_group": layout.zero1,
            "sequence_parallel": layout.sequence_parallel,
            "stages": [[list(chunk) for chunk in stage] for stage in layout.stages],
        },
        "summary": {s: sum(e.status == s for e in entries) for s in STATUSES},
        "notes": general_notes(cfg, layout),
        "fields": [asdict(e) for e in entries],
        "defaults": {k: _jsonable(v) for k, v in cfg.defaulted.items()},
    }


def report_json(cfg: InternLMConfig, layout: ParallelLayout) -> str:
    return json.dumps(report_dict(cfg, layout), indent=2) + "\n"


def report_markdown(cfg: InternLMConfig, layout: ParallelLayout) -> str:
    rep = report_dict(cfg, layout)
    s = rep["summary"]
    lines = [
        f"# Fidelity report: `{cfg.source}`",
        "",
        f"Family **{cfg.model.family}**; layout tp={layout.tp} pp={layout.pp} vpp={layout.vpp} "
        f"dp={layout.dp if layout.dp is not None else '? (give --world-size)'}"
        f"{' with sequence parallelism' if layout.sequence_parallel else ''}.",
        f"Layers per stage and chunk: {layout.layers_per_chunk()}.",
        "",
        f"**{s['exact']}** fields map exactly, **{s['approximate']}** approximately, "
        f"**{s['unsupported']}** not at all.",
        "",
    ]
    for status in ("unsupported", "approximate", "exact"):
        rows = [f for f in rep["fields"] if f["status"] == status]
        if not rows:
            continue
        lines += [f"## {status.capitalize()} ({len(rows)})", "", "| field | value | goes to | note |",
                  "|---|---|---|---|"]
        for f in rows:
            lines.append(f"| `{f['path']}` | `{_short(f['value'])}` | {_cell(f['target'])} | {_cell(f['note'])} |")
        lines.append("")
    lines += ["## Translation notes", ""]
    lines += [f"- **{title}.** {text}" for title, text in rep["notes"].items()]
    lines.append("")
    if rep["defaults"]:
        lines += ["## Defaults applied (InternEvo 0.5.2's values for absent keys)", "",
                  "| field | default |", "|---|---|"]
        lines += [f"| `{k}` | `{_short(v)}` |" for k, v in rep["defaults"].items()]
        lines.append("")
    return "\n".join(lines)


def general_notes(cfg: InternLMConfig, layout: ParallelLayout) -> dict[str, str]:
    """Differences that concern the run as a whole rather than one field."""
    from adapter.config.to_deepspeed import warmup_cosine_params

    d, lr = cfg.data, cfg.lr_scheduler
    ds_lr = warmup_cosine_params(cfg)
    notes = {
        "Batches": (
            f"megatron-core's schedule runs micro_num={d.micro_num} micro-batches of micro_bsz={d.micro_bsz} "
            f"packed sequences ({d.packed_length} tokens) per step. DeepSpeed sees one step-sized batch: "
            f"train_micro_batch_size_per_gpu={d.micro_num * d.micro_bsz} sequences of seq_len={d.seq_len}, "
            "gradient_accumulation_steps=1 (more would make DeepSpeed skip optimizer steps)."),
        "LR schedule": (
            f"InternEvo: lr=0 for init_steps={lr.init_steps}, linear warmup lr*(t+1)/{lr.warmup_steps} for "
            f"warmup_steps={lr.warmup_steps}, then cosine to eta_min={lr.eta_min:g} at t={lr.total_steps}. "
            f"DeepSpeed's WarmupCosineLR in ds_config.json: linear warmup from 0 over "
            f"{ds_lr['warmup_num_steps']} steps (its default warmup_type is 'log', so the JSON sets 'linear'; "
            "it forces at least 2 warmup steps), then cosine to cos_min_ratio="
            f"{ds_lr['cos_min_ratio']:g} of the peak lr (a ratio, not InternEvo's absolute floor)."),
        "Optimizer state sharding": (
            "DeepSpeed ZeRO stage 1 shards optimizer states over all data-parallel ranks"
            + (f" ({layout.dp})" if layout.dp else "")
            + (f"; InternEvo shards inside groups of zero1={cfg.parallel.zero1_size}." if cfg.parallel.zero1_size > 1
               else ".")),
    }
    if cfg.model.dtype == "fp32" and cfg.zero_optimizer.clip_grad_norm > 0:
        notes["Gradient clipping"] = (
            "InternEvo 0.5.2 computes and reports the gradient norm in fp32 but does not clip "
            f"(clip_grad_norm={cfg.zero_optimizer.clip_grad_norm:g} takes effect only in fp16/bf16); "
            + ("adapter.clip_grad_in_fp32=True clips this run anyway." if cfg.zero_optimizer.clip_in_fp32 else
               "this run does the same (gradient_clipping 0). adapter = dict(clip_grad_in_fp32=True) clips anyway."))
    if cfg.model.dtype == "fp16":
        notes["Loss scaling"] = (
            "DeepSpeed's dynamic loss scaler: initial_scale_power, loss_scale_window (= growth_interval), "
            "hysteresis (not consecutive, as InternEvo) and min_loss_scale come from grad_scaler; it always "
            "grows by 2 and backs off by 1/2, has no max_scale, and raises an error at min_scale where "
            "InternEvo clamps.")
    elif cfg.model.dtype == "bf16":
        notes["Loss scaling"] = ("InternEvo multiplies bf16 losses by grad_scaler.initial_scale and divides the "
                                 "gradients back, a numerical no-op; DeepSpeed's bf16 mode does not scale.")
    return notes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return _cell(text if len(text) <= 60 else text[:57] + "...")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
