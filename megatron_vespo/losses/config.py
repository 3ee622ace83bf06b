"""Config of the policy loss (owned by ``losses/``)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from megatron_vespo.config.base import Section
from megatron_vespo.losses.aggregation import AGG_MODES

AggMode = Literal[AGG_MODES]  # the aggregation module's list, one source of truth


class RolloutISConfig(Section):
    """Train/inference mismatch correction weights (TIS / MIS) from rollout vs training log-probs."""

    enabled: bool = False
    """Apply rollout importance-sampling weights (pi_old / mu_rollout)."""
    level: Literal["token", "sequence"] = "token"
    """Weights per token or per sequence."""
    mode: Literal["truncate", "mask"] = "truncate"
    """truncate: clamp weights at threshold (TIS); mask: drop tokens/sequences whose weight leaves [lower, threshold]
    (MIS)."""
    threshold: float = Field(2.0, gt=0)
    """Upper bound of the weights."""
    lower: Optional[float] = Field(None, ge=0)
    """Lower bound of the mask mode (default: 1 / threshold)."""


class LossConfig(Section):
    """Which registered policy loss to use and its parameters.

    Unknown ``params`` names, non-numeric values and a ``loss_agg_mode`` the loss cannot use are
    rejected when the config is validated (and again when the loss is called).
    """

    name: str = "vespo"
    """Registered policy loss (losses.available_losses())."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the loss (e.g. VESPO's c1_pos); unknown names are rejected."""
    loss_agg_mode: Optional[AggMode] = None
    """Token aggregation (default: the loss's own); one the loss cannot use is rejected."""
    rollout_is: RolloutISConfig = Field(default_factory=RolloutISConfig)
    """Train/inference mismatch correction weights (TIS / MIS)."""

    @field_validator("name")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        from megatron_vespo.losses import available_losses  # lazy: the registry fills on import

        known = available_losses()
        if known and name not in known:
            raise ValueError(f"unknown loss '{name}'; available: {', '.join(sorted(known))}")
        return name

    @model_validator(mode="after")
    def _known_params(self) -> "LossConfig":
        from megatron_vespo.losses import get_loss

        spec = get_loss(self.name)
        try:
            spec.check_params(self.params)
        except ValueError as exc:
            if not str(exc).startswith("unknown parameter"):
                raise
            # the usual cause: loss.name overridden while the YAML's loss.params belong to the old loss
            raise ValueError(f"{exc} (loss.params; to switch losses from the command line, reset them too: "
                             "--set 'loss.params={}')") from None
        spec.resolve_agg_mode(self.loss_agg_mode)
        return self
