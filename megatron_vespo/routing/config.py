"""Config of MoE routing replay (owned by ``routing/``)."""

from __future__ import annotations

from typing import Literal

from megatron_vespo.config.base import Section


class RoutingReplayConfig(Section):
    """Routing replay: which experts the MoE routers use in the training forwards (see ``mode``)."""

    mode: Literal["disabled", "R2", "R3"] = "disabled"
    """disabled: routers choose freely in every forward; R2: record the trainer's own routing in the old-log-prob
    forward and replay it in every update of that rollout batch; R3: replay the experts the rollout engine chose
    (captured at inference)."""
