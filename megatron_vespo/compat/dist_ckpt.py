"""Make megatron-core 0.16.1 ``dist_checkpointing`` (torch_dist backend) work on a CPU-only machine.

Complements ``megatron_vespo.compat.cpu.apply_cpu_compat`` (which this calls first) with the
patches only checkpointing needs; like it, an explicit idempotent call that does nothing when
CUDA is available. Paths are relative to ``megatron/core/dist_checkpointing/strategies/``:

1. ``filesystem_async.py:207,229``: the save path preloads tensors with ``non_blocking=True``
   and then calls ``torch.cuda.synchronize()``, which raises without CUDA -> preload with
   ``non_blocking=False`` (the copy to CPU is a no-op for CPU tensors anyway).
2. ``filesystem_async.py:51-56,266-335``: every save starts a ``spawn`` Manager process for a
   results queue and forks one writer process per bucket. Daemonic processes (pytest and
   multiprocessing workers) may not have children, and a failing writer leaves the parent
   waiting in ``count_queue.join()``. On CPU the writes are done in-process instead: same
   ``write_preloaded_data`` per bucket, same result dict, plain ``queue.Queue``s.

Independent of the device, :func:`patch_torch_adam_resume` fixes loading a distributed-optimizer
checkpoint when the inner optimizer is ``torch.optim.Adam`` (no Apex / Transformer Engine):
``optimizer/distrib_optimizer.py:937-940`` copies every key of the live per-parameter state,
which for torch Adam includes ``step``, from the loaded tensors, which do not have it (the step
is restored from the param groups at ``:817-823``) -> KeyError. The patch supplies the live step.

Checkpointing also needs ``psutil`` (``filesystem_async.py:642`` raises without it, inside the
writer, where the error used to turn into a hang); :func:`apply_dist_ckpt_cpu_compat` checks for
it up front on every platform.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import torch

from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)

_APPLIED = False
_ADAM_PATCHED = False


def apply_dist_ckpt_cpu_compat(force: bool = False) -> bool:
    """Patch megatron-core's torch_dist checkpoint writer for CPU; True when the patches are active.

    Always verifies that ``psutil`` imports (megatron's writer needs it). With CUDA present and
    not ``force`` it patches nothing and returns False.
    """
    global _APPLIED
    require("psutil", "megatron-core dist_checkpointing (pip install psutil)")
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    from megatron_vespo.compat.cpu import apply_cpu_compat

    apply_cpu_compat(force=force)
    fa = require("megatron.core.dist_checkpointing.strategies.filesystem_async", "dist checkpointing")
    writer = fa.FileSystemWriterAsync

    original_preload = writer.preload_tensors

    def preload_tensors(write_buckets: list, non_blocking: bool = True) -> list:
        return original_preload(write_buckets, False)

    def write_in_process(transform_list: list, use_msc: bool, rank: int, write_buckets: list,
                         global_results_queue: Any) -> None:
        results: dict[int, Any] = {}
        local_results: queue.Queue = queue.Queue()
        for i, bucket in enumerate(write_buckets):
            count: queue.Queue = queue.Queue()
            count.put(i)  # write_preloaded_data pops it and calls task_done()
            kwargs = {"use_msc": use_msc} if use_msc else {}
            writer.write_preloaded_data(transform_list, i, bucket, local_results, count, True, **kwargs)
            idx, res = local_results.get_nowait()
            if isinstance(res, Exception):
                global_results_queue.put(res)
                return
            results[idx] = res
        global_results_queue.put(results)

    writer.preload_tensors = staticmethod(preload_tensors)
    writer.write_preloaded_data_multiproc = staticmethod(write_in_process)
    fa._results_queue = queue.Queue()  # replaces the spawn Manager queue (_get_write_results_queue)
    _APPLIED = True
    logger.info("dist_checkpointing CPU patches applied (in-process writes)")
    return True


def patch_torch_adam_resume() -> None:
    """Let ``DistributedOptimizer`` load fully-reshardable state into torch Adam (see module docstring)."""
    global _ADAM_PATCHED
    if _ADAM_PATCHED:
        return
    do = require("megatron.core.optimizer.distrib_optimizer", "loading optimizer checkpoints")
    original = do.DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self: Any, model_param: Any, tensors: dict) -> None:
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        original(self, model_param, tensors)

    do.DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    _ADAM_PATCHED = True
