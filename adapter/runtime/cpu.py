"""Run megatron-core on a machine without CUDA (gloo, several local processes).

megatron-core assumes CUDA in a few places that the CPU path still reaches. This module is the *only*
place that works around them, and only when CUDA is absent. ``enable()`` must be called explicitly by a
launcher or test harness in every process (it never runs on import); calling it twice is harmless.

What it patches, and why (see ``CPU_NOTES.md`` from the project's CPU probe):

* **Device arguments.** The pipeline schedules and p2p communication allocate with ``device="cuda"`` or
  ``device=torch.cuda.current_device()``, and the tied-embedding sync calls ``tensor.cuda()``. A
  ``TorchFunctionMode`` rewrites every CUDA device argument (and ``Tensor.cuda``/``Tensor.to("cuda")``) to
  the CPU. ``torch.cuda.current_device`` answers ``"cpu"`` (a valid ``device=`` value: the tensor-parallel
  layers call it inside autograd ``backward``, where the mode is not active), and ``torch.cuda.synchronize``
  does nothing.
* **RNG.** ``model_parallel_cuda_manual_seed`` and the ``CudaRNGStatesTracker`` (used by dropout and by
  activation recompute) read and write the CUDA generator. They are pointed at the CPU generator, so the
  tracker's fork/restore semantics are kept (``torch.cuda.manual_seed`` maps to
  ``torch.default_generator.manual_seed``, not ``torch.manual_seed``, which would recurse).
* **Optimizer type checks.** megatron-core's optimizers (``DistributedOptimizer``, ``Float16OptimizerWithFloat16Params``)
  sort parameters by ``Tensor.type()`` strings and accept only ``torch.cuda.*Tensor``; the mode answers those
  names for CPU tensors (and maps them back when passed to ``Tensor.type(name)``), so megatron-core's own
  distributed optimizer runs here too (``bench/gpu.py --cpu-smoke``).
* **Peak memory.** ``torch.cuda.reset_peak_memory_stats``/``max_memory_allocated``/``memory_allocated``
  report the process's resident set (``VmHWM``, reset through ``/proc/self/clear_refs``; ``VmRSS``), so
  code that measures memory runs unchanged.

Checkpoint reading and writing, which names no device, runs with the mode paused (``paused``).

It was written against megatron-core 0.16-0.19 and refuses other versions, so that a silent change in
megatron-core's CUDA assumptions shows up as an error here rather than as wrong numbers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON = ((0, 16), (0, 20))  # [lower, upper)

_mode: "_CudaToCpu | None" = None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # a bare int means a CUDA ordinal (torch.cuda.current_device() returns one)
    return isinstance(device, int) and not isinstance(device, bool)


def _cuda_type_names(func, args: tuple, kwargs: dict) -> Any:
    """``Tensor.type()`` answers CUDA type names (``torch.cuda.BFloat16Tensor``) and ``Tensor.type(name)``
    takes them: megatron-core's optimizers sort parameters by those strings and refuse any other."""
    if len(args) > 1 and isinstance(args[1], str):
        args = (args[0], args[1].replace("torch.cuda.", "torch."), *args[2:])
    result = func(*args, **kwargs)
    if isinstance(result, str) and result.startswith("torch.") and not result.startswith("torch.cuda."):
        return "torch.cuda." + result[len("torch."):]
    return result


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type:
            return _cuda_type_names(func, args, kwargs)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _check_megatron_version() -> None:
    import megatron.core

    version = tuple(int(p) for p in megatron.core.__version__.split(".")[:2])
    low, high = SUPPORTED_MEGATRON
    if not low <= version < high:
        raise RuntimeError(
            f"adapter.runtime.cpu was written for megatron-core {low[0]}.{low[1]} to <{high[0]}.{high[1]}, "
            f"found {megatron.core.__version__}; check its CUDA assumptions before widening the range")


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = get_state
    torch.cuda.set_rng_state = set_state
    torch.cuda.random.get_rng_state = get_state
    torch.cuda.random.set_rng_state = set_state
    torch.cuda.manual_seed = torch.default_generator.manual_seed
    torch.cuda.manual_seed_all = torch.default_generator.manual_seed


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak(device: Any = None) -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # resets VmHWM to the current resident set


def _patch_memory() -> None:
    torch.cuda.reset_peak_memory_stats = _reset_peak
    torch.cuda.max_memory_allocated = lambda device=None: _status_bytes("VmHWM")
    torch.cuda.memory_allocated = lambda device=None: _status_bytes("VmRSS")


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The device rewriting off for a while (a no-op where it is not on). Every torch call, tensor methods
    and attributes included, goes through the mode's Python ``__torch_function__`` while it is on: some ten
    thousand calls in a resume's reading of a small model's checkpoint, a tenth of its time. Code that names no
    CUDA device (checkpoint reading and writing: tensors keep the device they have) runs paused."""
    if _mode is None:
        yield
        return
    with torch._C.DisableTorchFunction():
        yield


def enable() -> bool:
    """Make megatron-core usable on the CPU in this process. Returns False (doing nothing) if CUDA exists."""
    global _mode
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True
    _check_megatron_version()
    _patch_rng()
    _patch_memory()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    _mode = _CudaToCpu()
    _mode.__enter__()  # process-wide for the main thread; left active for the life of the process
    return True
