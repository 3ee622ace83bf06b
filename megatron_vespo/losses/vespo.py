r"""VESPO: sequence-level importance weight reshaped by a gamma kernel.

Paper: "VESPO" (arXiv 2602.10693); reference implementation FloyedShen/VESPO
``recipe/vespo/code/core_algos.py`` (``compute_policy_loss_vespo``), matched here exactly.

Formula (per sequence i, detached weights, no length normalisation)::

    log W_i   = clamp( sum_t m_it clamp(log pi_it - log mu_it, -20, 20)
                       [+ sum_t m_it clamp(log max(w^TIS_it, 1e-8), -20, 20)], -20, 20 )
    W_i       = exp(log W_i)                                      (stop-gradient)
    (c1, c2)  = (c1_pos, c2_pos) if A_i >= 0 else (c1_neg, c2_neg), c2 floored at 1e-4
    log phi_i = c2 + c1 log max(W_i, 1e-8) - c2 W_i    i.e. phi(W) = W^c1 exp(c2 (1 - W)), phi(1) = 1
    phi_i     = exp(log phi_i), NaN/inf -> 0                     (stop-gradient)
    loss_it   = -phi_i A_i log pi_it,  reduced with loss_agg_mode (default token-mean)

so grad loss = -sum phi_i A_i grad log pi_it / D: a REINFORCE gradient whose sequence
weight phi(W) peaks at W = c1/c2 and decays exponentially for large W. The reference's
``k``/``lambda`` are ``c1``/``c2`` here (defaults k_pos=2, lambda_pos=3, k_neg=3, lambda_neg=2).
Note the kernel takes log of the clamped W, so log W below log(1e-8) = -18.42 is floored
there (the reference does the same).

Shapes: log_prob, old_log_prob, response_mask, rollout_is_weights [B, T]; advantages [B]
(or row-constant [B, T]); W, phi [B].
"""

from __future__ import annotations

import torch

from megatron_vespo.losses.aggregation import agg_loss, masked_row_sum
from megatron_vespo.losses.inputs import PolicyLossInput
from megatron_vespo.losses.metrics import ess, kl_metrics, masked_mean, seq_stats
from megatron_vespo.losses.registry import register_loss

LOG_CLAMP = 20.0  # exp(20) ~ 4.9e8: the reference's safety bound on every log-ratio
W_FLOOR = 1e-8
C2_FLOOR = 1e-4


def sequence_log_weight(x: PolicyLossInput,
                        length_norm_power: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Detached per-sequence log W [B] (clamped to [-20, 20]), the token log-ratio [B, T] and log TIS [B].

    Shared by VESPO and SNIS: product of token ratios (a sum in log space), not divided by length.
    ``length_norm_power`` p > 0 is the paper's ablation only: log W / T_i^p before the clamp
    (p = 1: the per-token geometric mean, p = 0.5: / sqrt(T)).
    """
    with torch.no_grad():
        log_ratio = (x.log_prob.detach() - x.old_log_prob).clamp(-LOG_CLAMP, LOG_CLAMP)
        seq = (log_ratio * x.mask).sum(dim=-1)
        seq_tis = None
        if x.rollout_is_weights is not None:
            log_tis = torch.log(x.rollout_is_weights.clamp(min=W_FLOOR)).clamp(-LOG_CLAMP, LOG_CLAMP)
            seq_tis = (log_tis * x.mask).sum(dim=-1)
            seq = seq + seq_tis
        if length_norm_power:
            seq = seq / x.lengths.clamp(min=1).to(seq.dtype).pow(length_norm_power)
        return seq.clamp(-LOG_CLAMP, LOG_CLAMP), log_ratio, seq_tis


def gamma_kernel(w: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """phi(W) = W^c1 exp(c2 (1 - W)) evaluated in log space as the reference does; NaN/inf -> 0."""
    c2 = c2.clamp(min=C2_FLOOR)
    log_phi = c2 + c1 * torch.log(w.clamp(min=W_FLOOR)) - c2 * w
    return torch.nan_to_num(torch.exp(log_phi), nan=0.0, posinf=0.0, neginf=0.0)


@register_loss("vespo", default_agg_mode="token-mean", sequence_level=True)
def vespo_loss(
    x: PolicyLossInput,
    *,
    c1_pos: float = 2.0,
    c2_pos: float = 3.0,
    c1_neg: float = 3.0,
    c2_neg: float = 2.0,
    length_norm_power: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """VESPO: -phi(W) A log pi with phi(W) = W^c1 exp(c2 (1 - W)), W the detached sequence ratio.

    ``length_norm_power`` (default 0: none, as the paper prescribes) exists for the paper's ablation
    (log W / T and log W / sqrt(T): p = 1 and 0.5), which it reports to collapse or spike.
    """
    if not 0.0 <= length_norm_power <= 1.0:
        raise ValueError(f"length_norm_power must be in [0, 1] (0 = none, 0.5 = sqrt(T), 1 = T), "
                         f"got {length_norm_power}")
    log_w, log_ratio, seq_tis = sequence_log_weight(x, length_norm_power)
    w = torch.exp(log_w)
    seq_adv = x.seq_advantages()
    c1, c2 = sign_coefficients(seq_adv, w, (c1_pos, c2_pos), (c1_neg, c2_neg))
    phi = gamma_kernel(w, c1, c2)
    # One [B] coefficient per row: the token loss is a single broadcast multiply.
    coef = (phi * seq_adv).unsqueeze(-1)
    loss = agg_loss(-coef * x.log_prob, x.valid, x.loss_agg_mode, x.global_denominator)
    return loss, _vespo_metrics(x, log_w, w, phi, seq_adv, log_ratio, seq_tis)


def sign_coefficients(seq_adv: torch.Tensor, like: torch.Tensor, pos: tuple[float, float],
                      neg: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row kernel shape ``(c1 [B], c2 [B])`` in ``like``'s dtype: ``pos`` where the sequence advantage
    is >= 0, else ``neg``."""
    dtype, dev = like.dtype, like.device
    nonneg = seq_adv >= 0
    return tuple(torch.where(nonneg, torch.tensor(p, dtype=dtype, device=dev), torch.tensor(n, dtype=dtype, device=dev))
                 for p, n in zip(pos, neg))


def _vespo_metrics(x: PolicyLossInput, log_w: torch.Tensor, w: torch.Tensor, phi: torch.Tensor,
                   seq_adv: torch.Tensor, log_ratio: torch.Tensor, seq_tis: torch.Tensor | None) -> dict:
    """Sequence statistics over non-empty rows (empty rows have W = phi = 1 and would bias them)."""
    with torch.no_grad():
        rows = x.nonempty
        m: dict = {}
        m.update(seq_stats("vespo/w", w, rows))
        m.update(seq_stats("vespo/log_w", log_w, rows))
        m.update(seq_stats("vespo/phi", phi, rows))
        m["vespo/ess"] = ess(w, rows)
        for sign, sel in (("pos", rows & (seq_adv > 0)), ("neg", rows & (seq_adv < 0))):
            m[f"vespo/w_{sign}_mean"] = masked_mean(w, sel)
            m[f"vespo/phi_{sign}_mean"] = masked_mean(phi, sel)
            m[f"vespo/n_{sign}"] = sel.sum()
        # The reference's outlier watch: negative-advantage sequences whose W exceeds 100.
        m["vespo/n_neg_w_gt_100"] = (rows & (seq_adv < 0) & (w > 100.0)).sum()
        # Reference's approx_kl: per-sequence mean of log(mu/pi), averaged over sequences.
        seq_kl = -masked_row_sum(log_ratio, x.valid) / x.lengths.clamp(min=1)
        m["vespo/approx_kl_seq"] = masked_mean(seq_kl, rows)
        m["vespo/tis_enabled"] = float(seq_tis is not None)
        if seq_tis is not None:
            m.update(seq_stats("vespo/log_tis", seq_tis, rows))
        m.update(kl_metrics(log_ratio, x.valid))
        return m
