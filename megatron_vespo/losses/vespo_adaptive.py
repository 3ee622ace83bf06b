r"""Adaptive VESPO: the gamma kernel's scale chosen per batch so the kernel weights keep a target ESS.

VESPO (``vespo.py``, arXiv 2602.10693) weights each sequence by phi(W) = W^c1 exp(c2 (1 - W)). In
the paper's variational view phi is the optimal reshaping of the importance weight under two
moment constraints, and (c1, c2) are their Lagrange multipliers: how hard the reshaped proposal is
pulled toward the weights. The paper hand-picks them ((2, 3) / (3, 2) by advantage sign; its Fig. 7
shows (2, 3) for both signs unstable and (3, 2) slow). Here the multipliers adapt: one scale s
multiplies both, for both signs,

    phi_s(W) = phi(W)^s = W^(s c1) exp(s c2 (1 - W)),

which keeps phi_s(1) = 1, the mode W* = c1 / c2 of each sign (so the asymmetry between signs), and
the kernel's shape, and tempers how strongly it reweights. Per call, s is the largest value in
[min_scale, 1] with

    ESS(phi_s) = (sum_i phi_s,i)^2 / (n sum_i phi_s,i^2)  >=  target_ess        (n = non-empty rows)

i.e. the default kernel (s = 1) whenever its weights are healthy, softened toward uniform weights
(s -> 0: plain REINFORCE on the batch) only as far as needed. ESS(phi^s) is non-increasing in s
(d log ESS / ds = 2 (E_s[l] - E_2s[l]) <= 0 with l = log phi: tilting raises the mean), so the
threshold is found by bisection on detached [B] statistics, computed in log space; no extra forward.
With min_scale = 0 the target is always attainable (s = 0 gives ESS = 1).

Scope: the scale is chosen from the rows of one call. The Megatron actor calls the loss per
micro-batch, so s is per micro-batch (per mini-batch when micro_batch_size = mini_batch_size) and
per data-parallel rank; ``vespo/scale`` and the effective (c1, c2) are logged per call.

Shapes: as ``vespo.py``: log_prob, old_log_prob, response_mask, rollout_is_weights [B, T];
advantages [B] or row-constant [B, T]; W, phi [B].
"""

from __future__ import annotations

import math

import torch

from megatron_vespo.losses.aggregation import agg_loss
from megatron_vespo.losses.inputs import PolicyLossInput
from megatron_vespo.losses.metrics import masked_mean
from megatron_vespo.losses.registry import register_loss
from megatron_vespo.losses.vespo import C2_FLOOR, W_FLOOR, _vespo_metrics, sequence_log_weight, sign_coefficients

BISECTION_STEPS = 40  # interval [min_scale, 1] shrinks to 1e-12: exact to double precision for a [B] vector


def log_ess(log_weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log(ESS / n) of exp(``log_weights``) over ``rows`` (log space; 0-d, <= 0; -inf without rows, like ``ess``)."""
    if not bool(rows.any()):
        return torch.tensor(-math.inf, dtype=log_weights.dtype)
    lw = torch.where(rows, log_weights, torch.full_like(log_weights, -math.inf))
    n = rows.sum().clamp(min=1).to(log_weights.dtype)
    return 2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0) - torch.log(n)


def log_kernel(w: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """log phi(W) = c2 + c1 log max(W, 1e-8) - c2 W (VESPO's kernel before exponentiation)."""
    c2 = c2.clamp(min=C2_FLOOR)
    return c2 + c1 * torch.log(w.clamp(min=W_FLOOR)) - c2 * w


def choose_scale(log_phi: torch.Tensor, rows: torch.Tensor, target_ess: float, min_scale: float) -> float:
    """Largest s in [min_scale, 1] with ESS(exp(s log_phi)) / n >= target_ess (min_scale if none is)."""
    log_target = math.log(target_ess)
    lp = torch.nan_to_num(log_phi.detach().double(), nan=-1e30, neginf=-1e30)
    if rows.sum() < 2 or log_ess(lp, rows) >= log_target:
        return 1.0
    lo, hi = min_scale, 1.0
    if log_ess(lo * lp, rows) < log_target:
        return min_scale  # not attainable above min_scale: the softest kernel allowed
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if log_ess(mid * lp, rows) >= log_target:
            lo = mid
        else:
            hi = mid
    return lo


@register_loss("vespo_adaptive", default_agg_mode="token-mean", sequence_level=True, call_statistics=True)
def vespo_adaptive_loss(
    x: PolicyLossInput,
    *,
    c1_pos: float = 2.0,
    c2_pos: float = 3.0,
    c1_neg: float = 3.0,
    c2_neg: float = 2.0,
    target_ess: float = 0.5,
    min_scale: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """VESPO with phi^s, s the largest scale in [min_scale, 1] whose kernel weights keep ESS/n >= target_ess."""
    if not 0.0 < target_ess <= 1.0:
        raise ValueError(f"target_ess must be in (0, 1] (a fraction of the batch), got {target_ess}")
    if not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"min_scale must be in [0, 1], got {min_scale}")
    log_w, log_ratio, seq_tis = sequence_log_weight(x)
    w = torch.exp(log_w)
    seq_adv = x.seq_advantages()
    c1, c2 = sign_coefficients(seq_adv, w, (c1_pos, c2_pos), (c1_neg, c2_neg))
    with torch.no_grad():
        log_phi = log_kernel(w, c1, c2)
        rows = x.nonempty
        scale = choose_scale(log_phi, rows, target_ess, min_scale)
        phi = torch.nan_to_num(torch.exp(scale * log_phi), nan=0.0, posinf=0.0, neginf=0.0)
    coef = (phi * seq_adv).unsqueeze(-1)
    loss = agg_loss(-coef * x.log_prob, x.valid, x.loss_agg_mode, x.global_denominator)
    m = _vespo_metrics(x, log_w, w, phi, seq_adv, log_ratio, seq_tis)
    with torch.no_grad():
        m["vespo/scale"] = scale
        m["vespo/c1_pos_eff"], m["vespo/c2_pos_eff"] = scale * c1_pos, scale * c2_pos
        m["vespo/c1_neg_eff"], m["vespo/c2_neg_eff"] = scale * c1_neg, scale * c2_neg
        m["vespo/ess_phi_default"] = float(torch.exp(log_ess(torch.nan_to_num(log_phi, nan=-1e30), rows)))
        m["vespo/ess_phi"] = float(torch.exp(log_ess(torch.log(phi.clamp(min=1e-300)), rows)))
        m["vespo/phi_rows_mean"] = masked_mean(phi, rows)
    return loss, m
