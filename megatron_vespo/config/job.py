"""``JobConfig``: the whole run, composed of the sections each component owns."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, model_validator

from megatron_vespo.checkpoint.config import CheckpointConfig
from megatron_vespo.config.base import Section
from megatron_vespo.data.config import DataConfig
from megatron_vespo.evaluation.config import EvalConfig
from megatron_vespo.fp8.config import FP8Config
from megatron_vespo.losses.config import LossConfig
from megatron_vespo.models.config import ModelConfig
from megatron_vespo.observability.config import LoggingConfig
from megatron_vespo.orchestration.config import LoopConfig
from megatron_vespo.parallel.config import ParallelConfig
from megatron_vespo.rollout.config import RolloutConfig
from megatron_vespo.routing.config import RoutingReplayConfig
from megatron_vespo.train.config import TrainConfig
from megatron_vespo.weight_sync.config import WeightSyncConfig

logger = logging.getLogger(__name__)


def _move_deprecated_keys(data: Any) -> Any:
    """``loop.weight_sync`` (deprecated) -> ``weight_sync.kind``; both set and different is an error."""
    if not isinstance(data, dict):
        return data
    loop = data.get("loop")
    if isinstance(loop, LoopConfig):
        loop = loop.model_dump(exclude_unset=True) | ({"weight_sync": loop.weight_sync} if loop.weight_sync else {})
    if not isinstance(loop, dict) or loop.get("weight_sync") not in ("disk", "distributed", "tensor"):
        return data  # unset, or a bad value: LoopConfig's validation names loop.weight_sync
    data, loop = dict(data), dict(loop)
    old = loop.pop("weight_sync")
    sync = data.get("weight_sync")
    sync = sync.model_dump(exclude_unset=True) if isinstance(sync, WeightSyncConfig) else dict(sync or {})
    if not isinstance(sync, dict):
        return data  # not a mapping: the section's own validation names it
    if "kind" in sync and sync["kind"] != old:
        raise ValueError(f"loop.weight_sync={old} and weight_sync.kind={sync['kind']} disagree: loop.weight_sync is "
                         "the deprecated name of weight_sync.kind, set only weight_sync.kind")
    logger.warning("loop.weight_sync is deprecated: write weight_sync.kind=%s instead", old)
    data["loop"], data["weight_sync"] = loop, {**sync, "kind": old}
    return data


class JobConfig(Section):
    """One RL job; every YAML under ``examples/`` validates against this."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """Policy model."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Model-parallel layout."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation and staleness."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """Policy loss."""
    routing: RoutingReplayConfig = Field(default_factory=RoutingReplayConfig)
    """MoE routing replay."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Rollout engines."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Prompt data set."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Training checkpoints."""
    loop: LoopConfig = Field(default_factory=LoopConfig)
    """RL loop."""
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    """Weight sync to the engines."""
    fp8: FP8Config = Field(default_factory=FP8Config)
    """FP8 training (Transformer Engine)."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Metrics logging."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Held-out evaluation."""

    @model_validator(mode="before")
    @classmethod
    def _deprecated_keys(cls, data: Any) -> Any:
        return _move_deprecated_keys(data)

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobConfig":
        if self.routing.mode == "R3" and not self.rollout.return_routed_experts:
            raise ValueError("routing.mode=R3 replays the rollout engine's routes: set "
                             "rollout.return_routed_experts=true")
        if self.rollout.n_samples_per_prompt < 2:
            # advantages are group-relative (grpo/drgrpo/rloo): one sample per prompt gives advantage 0
            # everywhere, so every update would be a silent no-op
            raise ValueError("rollout.n_samples_per_prompt must be >= 2: advantages are computed within each "
                             "prompt's group of samples, and a group of 1 has advantage 0")
        if self.train.rollout_batch_size % self.rollout.n_samples_per_prompt:
            raise ValueError(f"train.rollout_batch_size ({self.train.rollout_batch_size}) must be a multiple "
                             f"of rollout.n_samples_per_prompt ({self.rollout.n_samples_per_prompt}) so "
                             "groups stay whole")
        if self.train.old_log_prob_source == "rollout" and self.loss.rollout_is.enabled:
            # the weights are pi_old / mu with pi_old := mu here: exactly 1 everywhere, a silent no-op
            raise ValueError("loss.rollout_is weights pi_old / mu_rollout are exactly 1 when "
                             "train.old_log_prob_source=rollout (pi_old is the rollout's mu): use "
                             "old_log_prob_source=recompute with loss.rollout_is, or disable loss.rollout_is")
        if "train_iters" not in self.train.model_fields_set:
            # the LR schedule spans the run unless told otherwise: with the old default of 1 step a
            # warm-up was clipped to 0 updates without a word (found calibrating the staleness task)
            object.__setattr__(self.train, "train_iters", self.loop.num_rollouts)
        updates = self.train.train_iters * self.train.staleness
        if self.train.lr_warmup_steps and self.train.lr_warmup_steps >= updates:
            raise ValueError(f"train.lr_warmup_steps ({self.train.lr_warmup_steps}) must be below the updates the LR "
                             f"schedule spans, train.train_iters x N = {self.train.train_iters} x "
                             f"{self.train.staleness} = {updates} (train.train_iters defaults to loop.num_rollouts)")
        self.train.check_optimizer_layout(self.parallel)  # CPU Adam / precision-aware optimizer need the dist. opt.
        from megatron_vespo.fp8.te import check_fp8_job

        check_fp8_job(self.fp8, self.model, self.parallel)  # FP8 rules across sections (no GPU needed)
        return self
