"""``ParallelConfig``: the model-parallel layout (Megatron-Core names, the ``parallel:`` section).

Field names follow Megatron-Core (``tensor_model_parallel_size``, ...) so they pass through to
``parallel_state.initialize_model_parallel`` unchanged.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field, model_validator

from megatron_vespo.config.base import Section


class ParallelConfig(Section):
    """Model-parallel layout (Megatron-Core names). World size = TP * PP * CP * DP."""

    tensor_model_parallel_size: int = Field(1, ge=1)
    """Tensor-parallel size (Megatron TP)."""
    pipeline_model_parallel_size: int = Field(1, ge=1)
    """Pipeline stages (Megatron PP)."""
    expert_model_parallel_size: int = Field(1, ge=1)
    """Expert-parallel size (Megatron EP)."""
    expert_tensor_parallel_size: Optional[int] = Field(None, ge=1)
    """Tensor-parallel size inside experts (default: tensor_model_parallel_size)."""
    context_parallel_size: int = Field(1, ge=1)
    """Context-parallel size (Megatron CP)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_model_parallel_size > 1)."""
    moe_token_dispatcher_type: Literal["allgather", "alltoall", "flex"] = "alltoall"
    """Megatron MoE token dispatcher."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""

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
