"""MoE routing replay: R2 (replay the trainer's own routes) and R3 (replay the rollout engine's).

Open ``replay`` first: it drives megatron-core's native ``RouterReplay`` (record, replay, and the
activation-recompute re-runs) and checks every recorded route is consumed exactly once.

* ``routes``: route tensors between the engine's compact form, ``TrainBatch`` and the routers
  (padding fillers, SP/CP slicing in one place).
* ``config``: ``RoutingReplayConfig`` (``mode``: none, R2, R3).
"""
