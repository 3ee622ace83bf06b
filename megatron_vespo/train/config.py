"""Config of the Megatron actor: parallel layout and optimisation (owned by ``train/``).

Field names follow Megatron-Core (``tensor_model_parallel_size``, ``moe_*``) so they can be
passed through to ``TransformerConfig`` / ``parallel_state`` unchanged.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field, model_validator

from megatron_vespo.config.base import Section


class ParallelConfig(Section):
    """Model-parallel layout (Megatron-Core names). World size = TP * PP * CP * DP."""

    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    expert_model_parallel_size: int = Field(1, ge=1)
    expert_tensor_parallel_size: Optional[int] = Field(None, ge=1)
    context_parallel_size: int = Field(1, ge=1)
    sequence_parallel: bool = False
    moe_token_dispatcher_type: Literal["allgather", "alltoall", "flex"] = "alltoall"
    use_distributed_optimizer: bool = True

    def check_world_size(self, world_size: int) -> None:
        """Raise ConfigError naming the fields when ``world_size`` ranks cannot hold this layout."""
        from megatron_vespo.config.base import ConfigError

        tp, pp, ep = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.expert_model_parallel_size
        etp, cp = self.expert_tensor_parallel_size or tp, self.context_parallel_size
        need = math.lcm(tp * pp * cp, etp * ep * pp)
        if world_size == 1 and need > 1:  # the usual cause: the job was started as one process, not by torchrun
            raise ConfigError(f"this parallel layout needs a multiple of {need} ranks and this is one process: "
                              f"launch it with torchrun --nproc-per-node {need} -m megatron_vespo.cli ...")
        if world_size % (tp * pp * cp):
            raise ConfigError(f"world size {world_size} is not a multiple of parallel.tensor_model_parallel_size * "
                              f"pipeline_model_parallel_size * context_parallel_size = {tp * pp * cp}")
        if world_size % (etp * ep * pp):
            raise ConfigError(f"world size {world_size} is not a multiple of parallel.expert_tensor_parallel_size * "
                              f"expert_model_parallel_size * pipeline_model_parallel_size = {etp * ep * pp} "
                              "(set parallel.expert_tensor_parallel_size=1 to combine TP and EP)")

    @model_validator(mode="after")
    def _sp_with_tp(self) -> "ParallelConfig":
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
        return self


class TrainConfig(Section):
    """Optimisation and the staleness schedule.

    One rollout batch of ``rollout_batch_size`` samples is consumed in
    N = rollout_batch_size / mini_batch_size optimizer updates (the paper's staleness);
    each mini-batch is split into micro-batches of ``micro_batch_size``.
    """

    rollout_batch_size: int = Field(8, ge=1)
    mini_batch_size: int = Field(8, ge=1)
    micro_batch_size: int = Field(1, ge=1)
    lr: float = Field(1e-6, gt=0)
    min_lr: float = Field(0.0, ge=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = Field(1.0, ge=0)
    old_log_prob_source: Literal["recompute", "rollout"] = "recompute"
    # recompute: update 1 runs on the weights the old log-probs are computed with, so its rows
    # take them from update 1's own forward (ratio 1 there, as verl on-policy) instead of a
    # separate forward; the other mini-batches still get a forward before update 1. Not with
    # routing R2 or loss.rollout_is (they need every old log-prob before update 1).
    fuse_old_log_prob: bool = True
    train_iters: int = Field(1, ge=1)
    seed: int = 1234

    @model_validator(mode="after")
    def _divisible(self) -> "TrainConfig":
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(f"train.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                             f"train.mini_batch_size ({self.mini_batch_size})")
        n = self.rollout_batch_size // self.mini_batch_size
        if n > 64:
            raise ValueError(f"staleness N = rollout_batch_size / mini_batch_size = {n} exceeds 64")
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"train.mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({self.micro_batch_size})")
        return self

    @property
    def staleness(self) -> int:
        """N: optimizer updates per rollout batch."""
        return self.rollout_batch_size // self.mini_batch_size
