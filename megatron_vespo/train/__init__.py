"""Trainer side: the Megatron-Core actor that turns a rollout batch into N optimizer updates.

Open ``actor`` first: :class:`~megatron_vespo.train.actor.MegatronActor` computes old log-probs
once (recording R2 routes), then runs N = rollout_batch / mini_batch updates with a loss from
``losses/``. Modules, in the order the actor uses them:

* ``config``: ``TrainConfig`` (optimisation, N); the layout (``ParallelConfig``, process groups)
  lives in the low-level ``megatron_vespo.parallel`` package (``train.config`` / ``train.parallel``
  re-export its names for older imports).
* ``optim``: Megatron DDP, distributed optimizer and LR schedule.
* ``batching``: ``TrainBatch`` -> mini-batches -> DP shards -> micro-batches.
* ``forward``: micro-batches through Megatron's forward-backward schedule (PP aware).
* ``logprobs``: per-token log-probs and entropy from vocab-parallel logits.
* ``metrics``: gathering per-rank results into batch tensors and update metrics.
* ``mismatch``: train/inference mismatch diagnostics (log-prob gap, routing drift).
* ``synthetic``: synthetic batches for tests and benchmarks (no rollout engine).
* ``interfaces``: the ``Actor`` protocol, what the loops use of the actor (their signatures take it).
"""
