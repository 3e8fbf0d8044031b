"""When to save and what to resume from, following the ``ckpt`` section as InternEvo documents it.

* Resume: with ``auto_resume`` (InternEvo's default) the newest complete checkpoint under
  ``save_ckpt_folder`` (numbered folders and both snapshot slots); otherwise ``load_ckpt_folder`` or
  ``load_ckpt_info`` with ``content`` including ``"all"``; ``load_optimizer=False`` keeps a fresh optimizer.
  Without any of those, ``load_model_only_folder`` (or ``load_ckpt_info`` with ``content=("model",)``)
  initialises the weights only, from any checkpoint ``internlm-ckpt`` reads (InternEvo at any layout, Hugging
  Face, megatron-core), before the DeepSpeed engine copies them into its fp32 master weights.
* Save: a normal checkpoint when ``step % checkpoint_every == 0`` or at ``total_steps``, else a snapshot into
  ``snapshot_ckpt_folder/{0,1}`` (alternating, starting with 0) when ``step % oss_snapshot_freq == 0``, else
  when the stop file asks for it: it holds one integer, ``-N`` = save at step N, ``+N`` = save and stop.
* Object storage: the checkpoint is written to a local staging folder (``async_upload_tmp_folder``), then
  uploaded by local rank 0 of each node, the completion marker last and only after every rank's files are
  up. With ``async_upload`` the upload runs in a background thread while training goes on; the next save
  (or the end of training) waits for it, checks that every node succeeded, and only then uploads the
  marker. A failed upload stops training with an error naming the object and the staging folder, where the
  checkpoint is kept complete (marker included) and recorded as pending; the next start uploads it before
  anything else, so ``auto_resume`` finds it.
* Start-up: every location is checked before any compute is spent (``preflight``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from adapter.train.state_files import (MARKER, atomic_save, completed_step, latest_checkpoint, load_model_weights,
                                     load_training_state, save_checkpoint, weights_from_optimizer)
from adapter.checkpoint.storage import Location, ObjectStore, StorageError, parse_location
from adapter.config.errors import ConfigError
from adapter.config.schema import InternLMConfig
from adapter.runtime.layout import ParallelLayout
from adapter.train.internevo_state import unread_optimizer
from adapter.train.preflight import check_readable, check_writable, on_rank0


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _all_ok(ok: bool) -> bool:
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if torch.cuda.is_available():
        flag = flag.cuda()
    dist.all_reduce(flag)
    return int(flag[0]) == 0


@dataclass(frozen=True)
class ResumePlan:
    """Where a launch starts from: ``where`` is None for a fresh start; ``full`` resumes the whole training
    state, otherwise only the weights are loaded. ``field`` is the config key that chose it."""

    where: Optional[Location]
    full: bool
    field: str


class Checkpointer:
    def __init__(self, cfg: InternLMConfig, layout: ParallelLayout):
        self.cfg, self.layout = cfg, layout
        ck = cfg.ckpt
        self.save: Optional[Location] = parse_location(ck.save_ckpt_folder, "ckpt.save_ckpt_folder") \
            if ck.enable_save_ckpt else None
        self.snapshot: Optional[Location] = parse_location(ck.snapshot_ckpt_folder, "ckpt.snapshot_ckpt_folder") \
            if ck.enable_save_ckpt and ck.oss_snapshot_freq else None
        self.snapshot_counter = -1
        staging = ck.async_upload_tmp_folder or os.path.join(tempfile.gettempdir(), "internlm_adapter_ckpt")
        self.staging = Path(staging) / cfg.job_name
        self.store = ObjectStore(self.save) if self.save is not None and self.save.backend == "s3" else None
        self.pool = ThreadPoolExecutor(max_workers=1) if self.store is not None and cfg.ckpt.async_upload else None
        self.pending: Optional[tuple[Future, Location, int, Path]] = None
        self.downloaded: set[Path] = set()
        self.nodes: Optional[int] = None  # how many nodes the job runs on, once a staged save asked

    # ---- start-up
    def check_storage(self) -> None:
        """Before step 1: every save location can be written (collective: rank 0 checks, every rank raises its
        ``StorageError``), then staged checkpoints a failed upload left are uploaded."""
        on_rank0(self.check_locations)
        self._upload_pending()

    def check_locations(self) -> None:
        """Rank 0's half of ``check_storage``: the save and snapshot locations and the staging folder of
        object-storage saves can be written, else one ``StorageError`` line naming the field."""
        if self.save is not None:
            check_writable("ckpt.save_ckpt_folder", self.save)
        if self.snapshot is not None:
            check_writable("ckpt.snapshot_ckpt_folder", self.snapshot)
        if self.store is not None:
            check_writable("ckpt.async_upload_tmp_folder", Location("local", path=self.staging))

    def check_load(self, plan: "ResumePlan") -> None:
        """The checkpoint ``plan`` loads exists (collective)."""
        if plan.where is not None:
            on_rank0(lambda: check_readable(plan.field, plan.where))

    def _pending_file(self, step: int) -> Path:
        return self.staging / f"{step}.pending.json"

    def _upload_pending(self) -> None:
        """Upload the checkpoints a failed upload kept in the staging folders (rank 0's records decide)."""
        if self.store is None:
            return
        pending: list = [[]]
        if dist.get_rank() == 0:
            records = [json.loads(p.read_text()) | {"step": int(p.name.split(".")[0])}
                       for p in self.staging.glob("*.pending.json")]
            pending[0] = sorted(records, key=lambda r: r["step"])
        dist.broadcast_object_list(pending, src=0)
        for record in pending[0]:
            step, staging = record["step"], self.staging / str(record["step"])
            target = Location("s3", bucket=record["bucket"], key=record["key"], endpoint=self.save.endpoint)
            if _local_rank() == 0 and not staging.is_dir():
                job = _done(_missing, staging)
            else:
                job = _done(self._upload, staging, target)
            self.pending = (job, target, step, staging)
            self.wait()

    # ---- resume
    def plan_resume(self) -> "ResumePlan":
        """What this launch starts from, decided once (collective with S3 auto-resume)."""
        ck = self.cfg.ckpt
        if ck.auto_resume and self.save is not None:
            latest = self._latest()
            if latest is not None:
                return ResumePlan(latest, True, "ckpt.save_ckpt_folder")
        info = ck.load_ckpt_info
        if info is not None:
            content = info.get("content", ("all",))
            content = (content,) if isinstance(content, str) else content
            return ResumePlan(parse_location(info["path"], "ckpt.load_ckpt_info.path"), "all" in content,
                              "ckpt.load_ckpt_info")
        if ck.load_ckpt_folder:
            return ResumePlan(parse_location(ck.load_ckpt_folder, "ckpt.load_ckpt_folder"), True,
                              "ckpt.load_ckpt_folder")
        if ck.load_model_only_folder:
            return ResumePlan(parse_location(ck.load_model_only_folder, "ckpt.load_model_only_folder"), False,
                              "ckpt.load_model_only_folder")
        return ResumePlan(None, False, "")

    def _latest(self) -> Optional[Location]:
        if self.save.backend == "local":
            snap = self.snapshot.path if self.snapshot is not None and self.snapshot.backend == "local" else None
            found = latest_checkpoint(self.save.path, snap)
            return Location("local", path=found) if found else None
        shared: list = [None, None]  # (best (step, folder), error message): one listing, sent to every rank
        if dist.get_rank() == 0:
            try:
                for key in self.store.keys(self.save.key + "/"):
                    folder, _, name = key.rpartition("/")
                    m = MARKER.match(name)
                    if m and (shared[0] is None or int(m[1]) > shared[0][0]):
                        shared[0] = (int(m[1]), folder)
            except StorageError as exc:  # every rank must fail, not wait for rank 0
                shared[1] = str(exc)
        dist.broadcast_object_list(shared, src=0)
        if shared[1] is not None:
            raise StorageError(shared[1])
        found = shared[0]
        return Location("s3", bucket=self.save.bucket, key=found[1], endpoint=self.save.endpoint) if found else None

    def _materialise(self, where: Location) -> Path:
        """A local folder with the checkpoint's files (downloaded by each node's local rank 0, once)."""
        if where.backend == "local":
            return where.path
        local = self.staging / "resume" / where.key.replace("/", "_")
        if local in self.downloaded:
            return local
        store = ObjectStore(where)
        if _local_rank() == 0:
            shutil.rmtree(local, ignore_errors=True)
            for key in store.keys(where.key + "/"):
                store.download(key, local / key[len(where.key) + 1:])
        dist.barrier()
        self.downloaded.add(local)
        return local

    def load_weights(self, plan: "ResumePlan", chunks: list) -> None:
        """Load ``plan``'s model into the chunks, at this run's layout whatever the saved one. Must run
        before the engine is built (``state_files.load_model_weights`` says why); a full resume's folder must
        be complete, and hold no optimizer files it cannot read where it restores the optimizer. A full resume
        with the optimizer takes the weights from its fp32 master weights instead
        (``state_files.weights_from_optimizer``), and reads no model file."""
        folder = self._materialise(plan.where)
        if plan.full and completed_step(folder) is None:
            raise ConfigError(plan.field, f"{plan.where}: not a complete checkpoint (no N.step marker)")
        unread = unread_optimizer(folder) if plan.full and self.cfg.ckpt.load_optimizer else None
        if unread is not None:
            raise ConfigError(plan.field, f"{unread}; set ckpt.load_optimizer=False to resume its weights and "
                                          "counters with a fresh optimizer")
        if not (plan.full and weights_from_optimizer(folder, self.cfg.ckpt.load_optimizer)):
            load_model_weights(folder, self.cfg, self.layout, chunks, plan.field)

    def load_state(self, plan: "ResumePlan", trainer) -> dict:
        """The rest of a full resume, once the engine exists: optimizer (unless ``load_optimizer=False``) and
        counters; returns the restored context (``context.pt`` with the sampler state under ``sampler``)."""
        return load_training_state(self._materialise(plan.where), self.cfg, self.layout, trainer,
                                   self.cfg.ckpt.load_optimizer, plan.field)

    # ---- save
    def _stop_request(self) -> int:
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
        if self.save is None:
            return False
        ck = self.cfg.ckpt
        stop = self._stop_request()
        target = None
        if step % ck.checkpoint_every == 0 or step == self.cfg.data.total_steps:
            target = self.save.child(str(step))
        elif self.snapshot is not None and step % ck.oss_snapshot_freq == 0:
            self.snapshot_counter = (self.snapshot_counter + 1) % 2
            target = self.snapshot.child(str(self.snapshot_counter))
        elif stop and abs(stop) == step:
            target = self.save.child(str(step))
        if target is not None:
            self._save(target, step, trainer, sampler, context)
        return stop > 0 and stop == step

    def _save(self, target: Location, step: int, trainer, sampler, context: dict) -> None:
        if target.backend == "local":
            save_checkpoint(target.path, self.cfg, self.layout, trainer, sampler, context, step)
            return
        self.wait()  # the previous upload, and its marker, first
        staging = self.staging / f"{step}"
        if _local_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()
        # each node stages its own files: ranks on several nodes cannot write one file together
        save_checkpoint(staging, self.cfg, self.layout, trainer, sampler, context, step, marker=False,
                        shared=self._one_node())
        if _local_rank() == 0:
            for key in self.store.keys(target.key + "/"):  # a reused snapshot slot loses its markers first
                if MARKER.match(key.rpartition("/")[2]):
                    self.store.delete(key)
        job = (self.pool.submit(self._upload, staging, target) if self.pool is not None
               else _done(self._upload, staging, target))
        self.pending = (job, target, step, staging)
        if self.pool is None:
            self.wait()

    def _one_node(self) -> bool:
        """Whether every rank runs on this node (collective the first time)."""
        if self.nodes is None:
            names: list = [None] * dist.get_world_size()
            dist.all_gather_object(names, socket.gethostname())
            self.nodes = len(set(names))
        return self.nodes == 1

    def _upload(self, staging: Path, target: Location) -> None:
        """Every staged file but the completion marker, which ``wait`` uploads once every node is done."""
        if _local_rank() != 0:
            return
        for path in sorted(p for p in staging.rglob("*") if p.is_file() and not MARKER.match(p.name)):
            self.store.upload(path, f"{target.key}/{path.relative_to(staging).as_posix()}")

    def wait(self) -> None:
        """Finish the pending upload on every node, then upload its completion marker (collective)."""
        if self.pending is None:
            return
        job, target, step, staging = self.pending
        self.pending = None
        error = job.exception()
        if not _all_ok(error is None):
            if dist.get_rank() == 0:  # keep it complete and on record: the next start uploads it
                atomic_save({"step": step}, staging / f"{step}.step")
                self._pending_file(step).write_text(json.dumps({"bucket": target.bucket, "key": target.key}))
            raise StorageError(f"checkpoint {step} was not uploaded to {target}: {error or 'failed on another node'}"
                               f"; it is kept complete in {staging} (on every node), and the next start uploads "
                               "it before training")
        if dist.get_rank() == 0:
            marker = staging / f"{step}.step"
            atomic_save({"step": step}, marker)
            self.store.upload(marker, f"{target.key}/{step}.step")
            self._pending_file(step).unlink(missing_ok=True)
        dist.barrier()
        if _local_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)

    def close(self) -> None:
        self.wait()
        if self.pool is not None:
            self.pool.shutdown()


def _missing(staging: Path) -> None:
    raise StorageError(f"{staging} is gone from this node, so its part of the checkpoint cannot be uploaded")


def _done(fn, *args) -> Future:
    """Run ``fn`` now and wrap its outcome like a finished ``Future`` (the synchronous upload path)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # reported through wait(), like an asynchronous failure
        future.set_exception(exc)
    return future
