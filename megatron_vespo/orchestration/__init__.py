"""The RL loop: prompts -> rollout -> buffer -> actor -> weight sync, synchronous or fully async.

Open ``sync_loop`` first: ``run_sync`` is the whole loop in ~35 lines under a pseudo-code
docstring. ``async_loop`` is the same data flow with generation running concurrently (Ray).

* ``cli``: ``megatron-vespo train`` (one process or torchrun).
* ``setup``: what both loops share (``LoopSetup``): actor, resume, data, reward, weight sync,
  engines, metrics rows, "run on rank 0 and share the result".
* ``engines``: start or attach to the rollout engines of ``rollout``.
* ``collect``: one rollout batch: prompts -> engines -> scored, whole, usable groups.
* ``sync_loop``: staleness N (one rollout batch feeds N updates).
* ``async_loop`` / ``rollout_worker`` / ``async_buffer``: the fully async loop, its generation
  worker and the bounded buffer that enforces ``loop.max_policy_lag``.
* ``config``: ``LoopConfig``.
"""
