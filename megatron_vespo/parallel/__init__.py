"""The model-parallel layout: a low-level package (as megatron-core keeps ``parallel_state``).

Open ``config`` first: ``ParallelConfig`` is the ``parallel:`` section (TP/PP/EP/CP sizes,
Megatron-Core names) with the world-size check. ``state`` brings the layout up and down:
``init_parallel`` (torch.distributed + ``parallel_state`` groups + model-parallel RNG seeds),
``destroy_parallel``, and ``parallel_session`` (a ``with`` block around both; import it from
``megatron_vespo.parallel.state``: this package's ``__init__`` stays light, no Megatron import).

Depends only on ``config``, ``compat`` and ``utils``; ``models``, ``checkpoint``, ``train`` and
``plan`` import it, never the reverse (``tests/test_layering.py``).
"""

from megatron_vespo.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
