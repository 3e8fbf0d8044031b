"""When to save and what to resume from, following the ``ckpt`` section as InternEvo documents it.

* Resume: with ``auto_resume`` (InternEvo's default) the newest complete checkpoint under
  ``save_ckpt_folder`` (numbered folders and both snapshot slots); otherwise ``load_ckpt_folder`` or
  ``load_ckpt_info`` with ``content`` including ``"all"``; ``load_optimizer=False`` keeps a fresh optimizer.
  Without any of those, ``load_model_only_folder`` (or ``load_ckpt_info`` with ``content=("model",)``)
  initialises the weights only, from an InternEvo folder saved at any layout.
* Save: a normal checkpoint when ``step % checkpoint_every == 0`` or at ``total_steps``, else a snapshot into
  ``snapshot_ckpt_folder/{0,1}`` (alternating, starting with 0) when ``step % oss_snapshot_freq == 0``, else
  when the stop file asks for it: it holds one integer, ``-N`` = save at step N, ``+N`` = save and stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from adapter.checkpoint.save import (completed_step, latest_checkpoint, load_model_weights, load_training_state,
                                     local_path, save_checkpoint)
from adapter.config.errors import ConfigError
from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout


class Checkpointer:
    def __init__(self, cfg: InternLMConfig, layout: ParallelLayout):
        self.cfg, self.layout = cfg, layout
        ck = cfg.ckpt
        self.save_folder = local_path(ck.save_ckpt_folder) if ck.enable_save_ckpt else None
        self.snapshot_folder = (local_path(ck.snapshot_ckpt_folder, "ckpt.snapshot_ckpt_folder")
                                if ck.enable_save_ckpt and ck.oss_snapshot_freq else None)
        self.snapshot_counter = -1

    def _resume_source(self) -> tuple[Optional[Path], bool]:
        """(folder, full): what to load, and whether it is a full resume (else weights only)."""
        ck = self.cfg.ckpt
        if ck.auto_resume and self.save_folder is not None:
            latest = latest_checkpoint(self.save_folder, self.snapshot_folder)
            if latest is not None:
                return latest, True
        info = ck.load_ckpt_info
        if info is not None:
            content = info.get("content", ("all",))
            if isinstance(content, str):
                content = (content,)
            return local_path(info["path"], "ckpt.load_ckpt_info.path"), "all" in content
        if ck.load_ckpt_folder:
            return local_path(ck.load_ckpt_folder, "ckpt.load_ckpt_folder"), True
        if ck.load_model_only_folder:
            return local_path(ck.load_model_only_folder, "ckpt.load_model_only_folder"), False
        return None, False

    def resume(self, trainer, chunks: list) -> dict:
        """Load what the config asks for; returns the restored context (``{}`` for a fresh start)."""
        folder, full = self._resume_source()
        if folder is None:
            return {}
        if full:
            if completed_step(folder) is None:
                raise ConfigError("ckpt", f"{folder}: not a complete checkpoint (no N.step marker)")
            return load_training_state(folder, trainer, self.cfg.ckpt.load_optimizer)
        load_model_weights(folder, self.cfg, self.layout, chunks)
        return {}

    def _stop_request(self) -> int:
        """The stop file's integer (0 when absent), read on rank 0 and shared with every rank."""
        value = torch.zeros(1, dtype=torch.int64)
        path = self.cfg.ckpt.stop_file_path
        if dist.get_rank() == 0 and path:
            try:
                value[0] = int(Path(path).read_text().strip() or 0)
            except (OSError, ValueError):
                value[0] = 0
        if torch.cuda.is_available():
            value = value.cuda()
        dist.broadcast(value, src=0)
        return int(value[0])

    def after_step(self, step: int, trainer, sampler, context: dict) -> bool:
        """Save if due; returns True when the stop file asked to stop now."""
        if self.save_folder is None:
            return False
        ck = self.cfg.ckpt
        stop = self._stop_request()
        folder = None
        if step % ck.checkpoint_every == 0 or step == self.cfg.data.total_steps:
            folder = self.save_folder / str(step)
        elif self.snapshot_folder is not None and step % ck.oss_snapshot_freq == 0:
            self.snapshot_counter = (self.snapshot_counter + 1) % 2
            folder = self.snapshot_folder / str(self.snapshot_counter)
        elif stop and abs(stop) == step:
            folder = self.save_folder / str(step)
        if folder is not None:
            save_checkpoint(folder, self.cfg, self.layout, trainer, sampler, context, step)
        return stop > 0 and stop == step
