"""Config of the Megatron actor's optimisation (owned by ``train/``).

The parallel layout lives in ``megatron_vespo.parallel.config`` (a low-level package models/ and
checkpoint/ use too); ``ParallelConfig`` is re-exported here for older imports.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from megatron_vespo.config.base import Section
from megatron_vespo.parallel.config import ParallelConfig

__all__ = ["ParallelConfig", "TrainConfig"]

MAX_STALENESS = 256
"""Largest staleness N = rollout_batch_size / mini_batch_size accepted (the sweep studies N up to 256)."""


class TrainConfig(Section):
    """Optimisation and the staleness schedule.

    One rollout batch of ``rollout_batch_size`` samples is consumed in
    N = rollout_batch_size / mini_batch_size optimizer updates (the paper's staleness);
    each mini-batch is split into micro-batches of ``micro_batch_size``.
    """

    rollout_batch_size: int = Field(8, ge=1)
    """Samples per rollout batch (a multiple of rollout.n_samples_per_prompt)."""
    mini_batch_size: int = Field(8, ge=1)
    """Samples per optimizer update; N = rollout_batch_size / mini_batch_size is the staleness."""
    micro_batch_size: int = Field(1, ge=1)
    """Samples per forward/backward pass within a mini-batch."""
    lr: float = Field(1e-6, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the decay."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Linear warm-up updates."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up."""
    weight_decay: float = Field(0.0, ge=0)
    """Adam weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = Field(1.0, ge=0)
    """Gradient-norm clip; 0 = off."""
    old_log_prob_source: Literal["recompute", "rollout"] = "recompute"
    """recompute: pi_old from a trainer forward before the updates; rollout: use the engine's log-probs."""
    fuse_old_log_prob: bool = True
    """With recompute, update 1 runs on the weights the old log-probs are computed with, so its rows take them from
    update 1's own forward (ratio 1 there, as verl on-policy) instead of a separate forward; the other mini-batches
    still get one before update 1. Not with routing R2 or rollout-IS weights (they need every old log-prob first)."""
    cpu_adam: Literal["foreach", "fused"] = "foreach"
    """CPU only (megatron's torch.optim.AdamW fallback without TE / Apex): foreach = the multi-tensor path; fused =
    torch's fused CPU kernel, 3-5x faster on the optimizer step (what transformers' Trainer picks by default) but
    not bit-identical to foreach (last-bit rounding, ~1e-9 on the addition model's weights)."""
    torch_threads: Optional[int] = Field(None, ge=1)
    """Torch threads of each trainer process (CPU). Unset: OMP_NUM_THREADS if set, else torch's default in sync mode
    and, in async mode with embedded engines, an even split of the cores with the engine processes
    (orchestration/threads.py), so the two do not oversubscribe them."""
    train_iters: int = Field(1, ge=1)
    """Rollout steps the LR schedule (warm-up, decay) spans, x N updates each; in a job it defaults to
    loop.num_rollouts."""
    seed: int = 1234
    """Trainer seed (Megatron model-parallel RNG, data order)."""
    # memory (megatron-core 0.16.1 OptimizerConfig fields, optimizer/optimizer_config.py):
    # CPU Adam keeps fp32 main weights and Adam moments of `optimizer_offload_fraction` of the
    # parameters in host memory and steps them there (HybridDeviceOptimizer); the precision-aware
    # optimizer lets the Adam kernel own main weights / moments. slime's Qwen3-30B-A3B recipe on
    # 8 x H100 turns on both.
    optimizer_cpu_offload: bool = False
    """Keep fp32 main weights and Adam moments in host memory and step them there (megatron-core 0.16.1
    HybridDeviceOptimizer)."""
    optimizer_offload_fraction: float = Field(1.0, ge=0.0, le=1.0)
    """Fraction of the parameters CPU Adam offloads (Megatron-LM's CLI default 1.0; the dataclass has 0)."""
    use_precision_aware_optimizer: bool = False
    """Let the Adam kernel own main weights / moments (megatron-core OptimizerConfig)."""

    @model_validator(mode="after")
    def _divisible(self) -> "TrainConfig":
        if self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(f"train.rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                             f"train.mini_batch_size ({self.mini_batch_size})")
        n = self.rollout_batch_size // self.mini_batch_size
        if n > MAX_STALENESS:
            raise ValueError(f"staleness N = rollout_batch_size / mini_batch_size = {n} exceeds {MAX_STALENESS} "
                             "(the largest staleness studied: docs/results.md)")
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"train.mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({self.micro_batch_size})")
        if self.optimizer_offload_fraction != 1.0 and not self.optimizer_cpu_offload:
            raise ValueError("train.optimizer_offload_fraction is set but train.optimizer_cpu_offload is false: "
                             "set train.optimizer_cpu_offload=true (or drop the fraction)")
        return self

    def check_optimizer_layout(self, parallel: "ParallelConfig") -> None:
        """ConfigError for optimizer memory options the layout cannot run (Megatron would assert).

        megatron-core 0.16.1 ``OptimizerConfig.__post_init__`` asserts the precision-aware optimizer
        runs under the distributed optimizer, and CPU offload is only wired through
        ``DistributedOptimizer`` (``distrib_optimizer.py`` ``HybridDeviceOptimizer`` branches).
        """
        from megatron_vespo.config.base import ConfigError

        for name in ("use_precision_aware_optimizer", "optimizer_cpu_offload"):
            if getattr(self, name) and not parallel.use_distributed_optimizer:
                raise ConfigError(f"train.{name} needs the distributed optimizer: set "
                                  "parallel.use_distributed_optimizer=true")

    @property
    def staleness(self) -> int:
        """N: optimizer updates per rollout batch."""
        return self.rollout_batch_size // self.mini_batch_size
