"""Process-group setup and teardown (torch.distributed + Megatron ``parallel_state``).

``init_parallel(parallel, seed)`` brings up ``torch.distributed`` (NCCL with CUDA, gloo on
CPU, after applying the CPU compatibility patches), Megatron's ``parallel_state`` groups from
a ``ParallelConfig`` and the model-parallel RNG seeds. ``destroy_parallel()`` undoes it, so
one process can build several layouts in sequence (tests, benchmarks); ``parallel_session`` is the
``with`` block around both.

Single-process use needs no launcher: without ``RANK``/``WORLD_SIZE`` in the environment a
1-process group on a free local port is created.
"""

from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch

from megatron_vespo.config.base import ConfigError
from megatron_vespo.parallel.config import ParallelConfig
from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's coordinates in the layout (what the actor and routing replay need)."""

    world_size: int
    rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    ep_rank: int
    ep_size: int
    dp_rank: int
    dp_size: int
    cp_size: int
    sequence_parallel: bool
    device: torch.device


def default_backend() -> str:
    """``nccl`` when CUDA is present, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    if torch.distributed.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # A 1-process group on an in-process store: nothing to rendezvous with, so no port. A
        # TCPStore (tcp://127.0.0.1:PORT) listens on every interface whatever host it is given,
        # and env:// would need RANK/WORLD_SIZE/MASTER_PORT in os.environ, which leak into every
        # subprocess this process starts (a later `torchrun` child would reuse the port and fail).
        if backend == "nccl":
            torch.cuda.set_device(0)
        torch.distributed.init_process_group(backend=backend, store=torch.distributed.HashStore(),
                                             rank=0, world_size=1, timeout=timeout)
        return
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])) % torch.cuda.device_count())
    torch.distributed.init_process_group(backend=backend, timeout=timeout)


def init_parallel(parallel: ParallelConfig, seed: int = 1234, *, backend: Optional[str] = None,
                  timeout_minutes: int = 30) -> ParallelInfo:
    """Initialise torch.distributed + Megatron parallel_state for ``parallel`` and seed RNGs.

    Idempotent for the same layout; raises ConfigError if a different layout is already
    initialised (call ``destroy_parallel()`` first) or the world size does not fit.
    """
    require("megatron.core", "the Megatron actor")
    from megatron.core import parallel_state

    from megatron_vespo.utils.versions import check_versions

    check_versions()  # megatron-core / transformers outside the tested ranges: say so before any patching

    from megatron_vespo.compat.cpu import apply_cpu_compat

    backend = backend or default_backend()
    if backend == "gloo":
        apply_cpu_compat()
    _init_process_group(backend, timeout_minutes)
    parallel.check_world_size(torch.distributed.get_world_size())
    tp, pp, ep = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.expert_model_parallel_size)
    etp = parallel.expert_tensor_parallel_size or tp
    cp = parallel.context_parallel_size
    if parallel_state.model_parallel_is_initialized():
        same = (parallel_state.get_tensor_model_parallel_world_size() == tp
                and parallel_state.get_pipeline_model_parallel_world_size() == pp
                and parallel_state.get_expert_model_parallel_world_size() == ep)
        if not same:
            raise ConfigError("a different parallel layout is already initialised; call destroy_parallel() first")
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            distributed_timeout_minutes=timeout_minutes,
        )
    seed_everything(seed)
    info = parallel_info(parallel)
    logger.info("parallel layout: %s", info)
    return info


def seed_everything(seed: int) -> None:
    """Seed python/numpy/torch and Megatron's model-parallel RNG tracker (TP/EP-rank offsets).

    numpy too: unseeded, it starts from OS entropy, so two fresh runs saved different RNG states
    in their checkpoints (and any numpy draw would differ between them).
    """
    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # inference_rng_tracker: the plain tracker without TE's CUDA-graph variant; with the CPU
    # compat layer its states live on the CPU generator.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, te_rng_tracker=False, force_reset_rng=True)


def parallel_info(parallel: ParallelConfig) -> ParallelInfo:
    """Coordinates of this rank in the initialised layout."""
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        world_size=torch.distributed.get_world_size(),
        rank=torch.distributed.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        cp_size=ps.get_context_parallel_world_size(),
        sequence_parallel=parallel.sequence_parallel,
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
        else torch.device("cpu"),
    )


def destroy_parallel(destroy_process_group: bool = False) -> None:
    """Tear down Megatron groups and routing-replay globals (and optionally torch.distributed)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.router_replay import RouterReplay

    RouterReplay.clear_global_router_replay_instances()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextmanager
def parallel_session(parallel: ParallelConfig, seed: int = 1234, **kwargs) -> Iterator[ParallelInfo]:
    """``with parallel_session(layout) as info:`` -- ``init_parallel`` on entry, ``destroy_parallel`` on exit.

    The process group is destroyed on exit only when this block created it (a ``torchrun`` job's
    group, or one a caller set up, outlives the block). ``kwargs`` go to :func:`init_parallel`.
    """
    created = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        yield init_parallel(parallel, seed, **kwargs)
    finally:
        destroy_parallel(destroy_process_group=created)
