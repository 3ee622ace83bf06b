"""Compatibility with machines megatron-core was not written for.

* ``cpu``: makes megatron-core 0.16.1 run on a CPU-only machine with gloo (tests and small runs);
  each patch names the megatron-core line it answers, and it is a no-op where CUDA exists.
  Background: ``shared/notes/megatron-core-on-cpu.md``. The ``dist_checkpointing`` patches are in
  ``megatron_vespo/checkpoint/compat.py``.
"""
