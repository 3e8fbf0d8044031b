"""Shared test helpers: paths of the shipped configs and a writer for small config files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "internlm_configs"
FIXTURES = REPO / "tests" / "fixtures" / "internevo"


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` are skipped, with the reason, where torch sees no CUDA device (torch is imported
    only when such a test was collected, so the torch-free config tests stay fast)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); run bench/gpu.sh "
                                   "on a GPU machine")
    for item in gpu:
        item.add_marker(skip)


def base_sections() -> dict:
    """A small valid InternLM1 config as sections (each test mutates its own copy)."""
    return {
        "JOB_NAME": "test",
        "model_type": "INTERNLM",
        "model": dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=128, mlp_ratio=8 / 3,
                      dtype="torch.float32", checkpoint=False, num_chunks=1, use_flash_attn=False),
        "data": dict(seq_len=16, micro_num=4, micro_bsz=2, total_steps=10, num_worker=0),
        "adam": dict(lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01),
        "lr_scheduler": dict(total_steps=10, init_steps=0, warmup_ratio=0.2, eta_min=1e-4, last_epoch=-1),
        "hybrid_zero_optimizer": dict(overlap_sync_grad=False, overlap_sync_param=False,
                                      reduce_bucket_size=1024, clip_grad_norm=1.0),
        "ckpt": dict(enable_save_ckpt=False),
        "parallel": dict(zero1=-1, tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1, interleaved_overlap=True)),
    }


def render_sections(sections: dict) -> str:
    """Python config source with one assignment per section (``name = repr(value)``)."""
    return "".join(f"{name} = {value!r}\n" for name, value in sections.items())


@pytest.fixture
def make_config(tmp_path):
    """Write sections (see ``base_sections``) as a ``.py`` config and return its path."""
    counter = iter(range(10**6))

    def make(sections: dict) -> Path:
        path = tmp_path / f"cfg{next(counter)}.py"
        path.write_text(render_sections(sections), encoding="utf-8")
        return path

    return make


@pytest.fixture
def write_config(tmp_path):
    """Write ``text`` (dedented) to a file in ``tmp_path`` and return its path."""

    def write(text: str, name: str = "cfg.py") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write
