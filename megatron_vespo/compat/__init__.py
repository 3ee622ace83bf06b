"""Compatibility with machines megatron-core was not written for.

* ``cpu``: makes megatron-core 0.16.1 run on a CPU-only machine with gloo (tests and small runs);
  each patch names the megatron-core line it answers, and it is a no-op where CUDA exists.
  Background: ``shared/notes/megatron-core-on-cpu.md``.
* ``dist_ckpt``: the patches only ``dist_checkpointing`` needs (CPU saves in-process, torch Adam
  resume); it applies ``cpu`` first.
* ``device_mode``: ``cpu``'s patches 8 and 10, scoped to megatron code that names the "cuda" device.
"""
