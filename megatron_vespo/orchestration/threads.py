"""How many torch threads the trainer and the embedded engine processes use on a CPU machine.

torch's default is one intra-op thread per core in *every* process. In ``loop.mode=async``
the trainer and the embedded engine (a separate process there) compute at the same time, so
with the default each asks for all the cores and they oversubscribe them: on 2 cores, 2 + 2
threads spin and preempt each other (and the Ray rollout worker runs as well). The policy:

- ``train.torch_threads`` / ``rollout.engine_threads`` set: used as given.
- unset and ``OMP_NUM_THREADS`` set in the environment: left to it (torch reads it at start-up
  in every process, the engine children inherit it).
- unset otherwise, in async mode with embedded engines in processes: the cores this process
  may run on (``os.sched_getaffinity``) are split evenly between the local trainer ranks
  (``LOCAL_WORLD_SIZE``, torchrun's variable, default 1) and the engine processes, at least
  one thread each; e.g. 2 cores, 1 trainer, 1 engine: 1 + 1.
- sync mode (generation and training take turns; one engine is a thread of the trainer): the
  trainer keeps torch's default, engine processes (several engines) the same even split.

GPU jobs are not affected (the count only matters for CPU kernels).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)


def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _local_trainers() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def even_share(processes: int, cpus: Optional[int] = None) -> int:
    """Threads per process when ``processes`` busy processes split the available cores (>= 1)."""
    return max(1, (available_cpus() if cpus is None else cpus) // max(1, processes))


def trainer_threads(job: Any) -> Optional[int]:
    """The trainer's torch thread count for ``job`` (None: leave torch's setting)."""
    if job.train.torch_threads is not None:
        return job.train.torch_threads
    if os.environ.get("OMP_NUM_THREADS") or job.loop.mode != "async" or job.rollout.engine != "embedded":
        return None
    return even_share(_local_trainers() + job.rollout.num_engines)


def engine_threads(rollout: Any, overlapped: bool) -> Optional[int]:
    """Torch threads of each embedded engine *process* (None: inherit the environment / torch's default).

    ``overlapped``: the engines generate while the trainer trains (async mode), so the trainer's
    ranks take their share of the cores too.
    """
    if rollout.engine_threads is not None:
        return rollout.engine_threads
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return even_share(rollout.num_engines + (_local_trainers() if overlapped else 0))


def apply_trainer_threads(job: Any) -> Optional[int]:
    """Set this trainer process's torch threads by the policy above; returns the count set (None: unchanged)."""
    import torch

    n = trainer_threads(job)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
        logger.info("trainer: %d torch thread(s) (train.torch_threads; %d core(s) available)", n, available_cpus())
    return n
