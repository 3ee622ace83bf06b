"""Moved to :mod:`megatron_vespo.parallel.state`; these names are re-exported for older imports."""

from megatron_vespo.parallel.state import (  # noqa: F401
    ParallelInfo,
    _init_process_group,
    default_backend,
    destroy_parallel,
    init_parallel,
    parallel_info,
    parallel_session,
    seed_everything,
)

__all__ = ["ParallelInfo", "default_backend", "destroy_parallel", "init_parallel", "parallel_info",
           "parallel_session", "seed_everything"]
