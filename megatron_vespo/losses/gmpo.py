r"""GMPO: Geometric-Mean Policy Optimization (arXiv 2507.20673).

Reference: verl ``compute_policy_loss_geo_mean`` (registered there as ``geo_mean``), as
vendored in FloyedShen/VESPO. Per token, the log-ratio is clipped in log space on the side
that matters for the advantage's sign; the sequence ratio is the geometric mean::

    d_t   = log pi_t - log mu_t, clamped to [-20, 20] (verl leaves this clamp commented out;
            we enable it so |d| up to 1e4 stays finite: identical whenever |d_t| <= 20)
    sgn   = sign(A)
    c_t   = sgn * min(sgn d_t, sgn clamp(d_t, -eps_low, eps_high))
    rho_i = exp(sum_t m c_t / n_i)                 (n_i = valid tokens, + 1e-8 as verl)
    l_i   = -A_i rho_i [* exp(sum_t m log(w_t + 1e-10) / n_i) with TIS weights w]
    loss  = sum_i l_i / B                          (mean over all rows, verl's torch.mean)

``eps_low`` / ``eps_high`` are log-space bounds (default 0.4 each, GMPO's setting).
``loss_agg_mode`` is not used; micro-batch D = number of rows.

Shapes: log_prob, old_log_prob, response_mask [B, T]; advantages [B] or row-constant [B, T].
"""

from __future__ import annotations

import torch

from megatron_vespo.losses.aggregation import divide_by_denominator
from megatron_vespo.losses.inputs import PolicyLossInput
from megatron_vespo.losses.metrics import clip_fraction, kl_metrics, masked_stats
from megatron_vespo.losses.registry import register_loss

LOG_CLAMP = 20.0


@register_loss("gmpo", default_agg_mode=None, reduction="rows", sequence_level=True)
def gmpo_loss(
    x: PolicyLossInput,
    *,
    clip_ratio_low: float = 0.4,
    clip_ratio_high: float = 0.4,
) -> tuple[torch.Tensor, dict]:
    """GMPO: geometric mean of sign-aware log-space-clipped token ratios times A, mean over rows."""
    if clip_ratio_low < 0 or clip_ratio_high < 0:
        raise ValueError(f"clip_ratio_low / clip_ratio_high must be >= 0, got {clip_ratio_low} / {clip_ratio_high}")
    delta = (x.log_prob - x.old_log_prob).clamp(-LOG_CLAMP, LOG_CLAMP)
    adv = x.advantages  # [B, 1], row-constant
    sgn = torch.sign(adv)
    delta_clamped = delta.clamp(-clip_ratio_low, clip_ratio_high)
    clipped = sgn * torch.minimum(sgn * delta, sgn * delta_clamped)
    # verl divides by (n + 1e-8): kept so the value matches to the last bit.
    denom = x.lengths + 1e-8
    rho = torch.exp((clipped * x.mask).sum(dim=-1) / denom)
    seq_loss = -adv[:, 0] * rho
    if x.rollout_is_weights is not None:
        log_w = torch.log(x.rollout_is_weights + 1e-10)
        seq_loss = seq_loss * torch.exp((log_w * x.mask).sum(dim=-1) / denom)
    loss = divide_by_denominator(seq_loss.sum(), x.global_denominator, seq_loss.shape[0])
    with torch.no_grad():
        m = masked_stats("ratio", torch.exp(delta.detach()), x.valid)
        m.update(masked_stats("seq_ratio", rho.detach(), x.nonempty))
        m.update(kl_metrics(delta.detach(), x.valid))
        was_clipped = delta.detach() != delta_clamped.detach()
        m["clipfrac"] = clip_fraction(was_clipped & (adv > 0), x.valid)
        m["clipfrac_lower"] = clip_fraction(was_clipped & (adv < 0), x.valid)
    return loss, m

