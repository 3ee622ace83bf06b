"""Config of the RL loop (owned by ``orchestration/``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from megatron_vespo.config.base import Section


class LoopConfig(Section):
    """Loop mode.

    ``sync``: generate a rollout batch, train N updates on it, sync weights, repeat.
    ``async``: rollout and training run concurrently (Ray); samples older than
    ``max_policy_lag`` versions are dropped.
    """

    mode: Literal["sync", "async"] = "sync"
    num_rollouts: int = Field(1, ge=1)
    max_policy_lag: int = Field(1, ge=0)
    weight_sync: Literal["disk", "tensor", "distributed"] = "disk"
    output_dir: str = "outputs/run"
