"""Checkpoints: training save/resume, and Hugging Face <-> Megatron conversion.

Two jobs live here; open the module named first for each.

Training checkpoints (what the loop calls):

* ``checkpointer``: :class:`Checkpointer`, the loop's policy: what to resume at start-up (a
  training checkpoint, a model checkpoint or an HF directory) and when to save (``CheckpointConfig``).
  Calls ``training`` for the files.
* ``training``: one training checkpoint on disk and the ``save_dir`` around it: model + optimizer
  (dist_checkpointing), scheduler, RNG of every rank, loop state; the ``latest`` pointer,
  rotation, atomic renames and leftover cleaning.
* ``dist``: multi-rank helpers (a collective atomic directory, a local launcher for tests).
* ``safety`` / ``faults``: safe loading and disk-full errors / kill points for the fault tests.
* ``config``: ``CheckpointConfig``.

Conversion (``megatron-vespo convert``) and the three kinds of weights on disk or in memory:

* ``convert``: HF <-> Megatron for Qwen3-MoE under any layout, with ``--verify``; ``cli`` is its
  argument parser.
* ``mapping``: names and tensor layouts between HF Qwen3-MoE and Megatron ``GPTModel`` (one
  table, also used by weight sync).
* ``hf_weights``: a live, sharded Megatron model <-> HF-named tensors (gathers TP/EP/PP shards,
  in byte-size buckets); weight sync streams from it.
* ``hf_dir``: HF checkpoint directories (safetensors, index, side files, config dtype names),
  and ``save_hf_checkpoint``: a live model written as one.
* ``model_ckpt``: Megatron model checkpoint directories (dist_checkpointing torch_dist + metadata
  + the HF config beside it); every training checkpoint contains one.

The CPU-only patches for ``dist_checkpointing`` are with the other megatron-core patches, in
``megatron_vespo/compat/dist_ckpt.py``.
"""
