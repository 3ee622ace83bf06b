r"""Train/inference mismatch correction: TIS and MIS weights from rollout vs training log-probs.

The rollout engine (SGLang, bf16 kernels, other routing) samples from pi_rollout while the
trainer's recomputed log-probs describe pi_old. The correction weight is

    w_t = pi_old(y_t) / pi_rollout(y_t) = exp(clamp(log pi_old - log pi_rollout, -20, 20))   (token level)
    w_i = exp(clamp(sum_t m (log pi_old - log pi_rollout), -20, 20)), broadcast over row i   (sequence level)

following verl's ``rollout_corr_helper.compute_rollout_correction_weights`` /
``compute_rollout_rejection_mask``:

* ``truncate`` (TIS, Yao et al. "Your efficient RL framework secretly brings you off-policy
  RL training"): w <- min(w, threshold); the mask is unchanged.
* ``mask`` (MIS, rejection): keep = lower <= w <= threshold (lower defaults to 1/threshold as
  in verl); w is zeroed where rejected and the caller multiplies ``response_mask`` by ``mask``
  (a sequence-level rejection drops the whole row).

Weights are detached and zero on padding. Pass them as ``rollout_is_weights`` to
``compute_policy_loss`` (VESPO folds them into log W; see each loss for its placement).

Shapes: log-probs and mask [B, T]; returned weights and mask [B, T].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_vespo.losses.aggregation import masked_mean, masked_row_sum
from megatron_vespo.losses.config import RolloutISConfig
from megatron_vespo.losses.metrics import ess, masked_stats, to_floats

LOG_CLAMP = 20.0


@dataclass
class RolloutISResult:
    """Output of :func:`compute_rollout_is_weights`.

    Attributes:
        weights: [B, T] detached weights (zero on padding and rejected tokens), or None when disabled.
        mask: [B, T] float mask to multiply into ``response_mask`` (all ones on valid tokens for TIS).
        metrics: python floats, keys prefixed ``rollout_is/``.
    """

    weights: Optional[torch.Tensor]
    mask: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def compute_rollout_is_weights(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    config: RolloutISConfig,
) -> RolloutISResult:
    """Compute TIS (truncate) or MIS (mask) weights at token or sequence level from ``config``.

    Args:
        old_log_prob: [B, T] trainer log-probs of the sampled tokens (pi_old).
        rollout_log_prob: [B, T] rollout engine log-probs of the same tokens (pi_rollout).
        response_mask: [B, T] bool or 0/1.
        config: :class:`RolloutISConfig` (``enabled``, ``level``, ``mode``, ``threshold``, ``lower``).
    """
    for name, t in (("old_log_prob", old_log_prob), ("rollout_log_prob", rollout_log_prob),
                    ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a [B, T] tensor")
        if t.shape != old_log_prob.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(old_log_prob.shape)}")
        if t.device != old_log_prob.device:
            raise ValueError(f"{name} is on {t.device} but old_log_prob is on {old_log_prob.device}")
    if rollout_log_prob.dtype != old_log_prob.dtype:
        raise ValueError(f"rollout_log_prob has dtype {rollout_log_prob.dtype} but old_log_prob has "
                         f"{old_log_prob.dtype}")
    valid = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    fmask = valid.to(old_log_prob.dtype)
    if not config.enabled:
        return RolloutISResult(weights=None, mask=fmask)
    for name, t in (("old_log_prob", old_log_prob), ("rollout_log_prob", rollout_log_prob)):
        if bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contains NaN")
    lower = config.lower if config.lower is not None else 1.0 / config.threshold
    if lower > config.threshold:
        raise ValueError(f"rollout_is.lower ({lower}) exceeds rollout_is.threshold ({config.threshold})")

    with torch.no_grad():
        log_ratio = (old_log_prob - rollout_log_prob).clamp(-LOG_CLAMP, LOG_CLAMP)
        seq_log = masked_row_sum(log_ratio, valid)
        if config.level == "token":
            log_w = log_ratio
        else:
            # Sequence weight: product of token ratios; each token carries its row's weight.
            log_w = seq_log.clamp(-LOG_CLAMP, LOG_CLAMP).unsqueeze(-1).expand_as(log_ratio)
        raw = torch.exp(log_w) * fmask
        if config.mode == "truncate":
            weights = raw.clamp(max=config.threshold)
            keep = fmask
        else:
            keep = ((raw >= lower) & (raw <= config.threshold)).to(fmask.dtype) * fmask
            weights = raw * keep
        metrics = _metrics(raw, weights, keep, valid, seq_log, config.threshold, lower)
    return RolloutISResult(weights=weights.detach(), mask=keep, metrics=metrics)


def _metrics(raw: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor,
             seq_log: torch.Tensor, upper: float, lower: float) -> dict[str, float]:
    p = "rollout_is/"
    m: dict = {}
    m.update(masked_stats(p + "raw", raw, valid))
    m.update(masked_stats(p + "weight", weights, valid))
    m[p + "frac_high"] = masked_mean((raw > upper).to(raw.dtype), valid)
    m[p + "frac_low"] = masked_mean((raw < lower).to(raw.dtype), valid)
    m[p + "masked_frac"] = masked_mean(1.0 - keep, valid)
    rows = valid.any(dim=-1)
    dropped_rows = rows & ((keep.sum(-1)) < valid.sum(-1))
    m[p + "seq_masked_frac"] = dropped_rows.sum().to(raw.dtype) / rows.sum().clamp(min=1)
    # log of the product of token ratios (what a sequence-level loss such as VESPO sees).
    m.update(masked_stats(p + "seq_log_ratio", seq_log, rows))
    m[p + "ess"] = ess(masked_row_sum(weights, valid) / valid.sum(-1).clamp(min=1), rows)
    return to_floats(m)
