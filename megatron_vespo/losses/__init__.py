"""Policy losses for off-policy RL post-training (pure torch, no Megatron import).

One registry maps names to losses; every loss takes the same tensors::

    from megatron_vespo.losses import compute_policy_loss
    loss, metrics = compute_policy_loss(
        "vespo", log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask,
        loss_agg_mode=None, rollout_is_weights=None, group_index=None, c1_pos=2.0)

Shapes: log_prob, old_log_prob, response_mask (bool or 0/1), rollout_is_weights [B, T];
advantages [B] or [B, T]; group_index [B]. ``metrics`` is a dict of python floats.

Registered losses (one module per family, each opening with its formula and paper):
``vespo`` (vespo.py), ``grpo``, ``gspo``, ``sapo``, ``cispo``, ``gpg`` (ppo.py), ``gmpo``,
``gepo``, ``snis`` (sequence.py). Aggregation modes and the micro-batch
``global_denominator`` contract are documented in ``aggregation.py``; TIS/MIS weights
in ``rollout_is.py``. docs/losses.md has the full reference.
"""

from megatron_vespo.losses import ppo as _ppo  # noqa: F401  (registers grpo, gspo, sapo, cispo, gpg)
from megatron_vespo.losses import psis as _psis  # noqa: F401  (registers psis)
from megatron_vespo.losses import sequence as _sequence  # noqa: F401  (registers gmpo, gepo, snis)
from megatron_vespo.losses import vespo as _vespo  # noqa: F401  (registers vespo)
from megatron_vespo.losses import vespo_adaptive as _vespo_adaptive  # noqa: F401  (registers vespo_adaptive)
from megatron_vespo.losses.aggregation import AGG_MODES, agg_loss, local_denominator
from megatron_vespo.losses.inputs import PolicyLossInput
from megatron_vespo.losses.registry import (
    LossSpec,
    available_losses,
    compute_policy_loss,
    get_loss,
    loss_denominator,
    mini_batch_denominator,
    register_loss,
    unregister_loss,
)
from megatron_vespo.losses.rollout_is import RolloutISResult, compute_rollout_is_weights

__all__ = [
    "AGG_MODES",
    "LossSpec",
    "PolicyLossInput",
    "RolloutISResult",
    "agg_loss",
    "available_losses",
    "compute_policy_loss",
    "compute_rollout_is_weights",
    "get_loss",
    "local_denominator",
    "loss_denominator",
    "mini_batch_denominator",
    "register_loss",
    "unregister_loss",
]
