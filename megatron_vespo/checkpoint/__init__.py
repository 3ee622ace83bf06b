"""Checkpoints: training save/resume, and Hugging Face <-> Megatron conversion.

Two jobs live here; open the module named first for each.

Training checkpoints (what the loop calls):

* ``manager``: resume at start-up and save on schedule (``CheckpointConfig``): directory layout,
  the ``latest`` pointer, rotation, atomic renames. Calls ``trainer_ckpt``.
* ``trainer_ckpt``: what one checkpoint holds: model + optimizer (dist_checkpointing), scheduler,
  RNG of every rank, loop state.
* ``dist``: multi-rank helpers (a collective atomic directory, a local launcher for tests).
* ``config``: ``CheckpointConfig``.

Conversion (``megatron-vespo convert``):

* ``convert``: HF <-> Megatron for Qwen3-MoE under any layout, with ``--verify``; ``cli`` is its
  argument parser.
* ``mapping``: names and tensor layouts between HF Qwen3-MoE and Megatron ``GPTModel`` (one
  table, also used by weight sync).
* ``export``: a live, sharded Megatron model <-> HF tensors (gathers TP/EP/PP shards);
  weight sync streams from it.
* ``mcore_io``: Megatron checkpoint files (dist_checkpointing, torch_dist) and HF export of a
  live model to a directory.
* ``hf_io``: HF checkpoint directories (safetensors, index, side files).
* ``compat``: the CPU-only patches for ``dist_checkpointing`` (the model-side patches are in
  ``megatron_vespo/compat/cpu.py``).
"""
