r"""Sequence- and group-level losses: GMPO, GEPO and self-normalised IS (SNIS).

GMPO, Geometric-Mean Policy Optimization (arXiv 2507.20673); reference: verl
``compute_policy_loss_geo_mean`` (registered there as ``geo_mean``), as vendored in
FloyedShen/VESPO. Per token, the log-ratio is clipped in log space on the side that matters
for the advantage's sign; the sequence ratio is the geometric mean::

    d_t   = log pi_t - log mu_t, clamped to [-20, 20] (verl leaves this clamp commented out;
            we enable it so |d| up to 1e4 stays finite: identical whenever |d_t| <= 20)
    sgn   = sign(A)
    c_t   = sgn * min(sgn d_t, sgn clamp(d_t, -eps_low, eps_high))
    rho_i = exp(sum_t m c_t / n_i)                 (n_i = valid tokens, + 1e-8 as verl)
    l_i   = -A_i rho_i [* exp(sum_t m log(w_t + 1e-10) / n_i) with TIS weights w]
    loss  = sum_i l_i / B                          (mean over all rows, verl's torch.mean)

``eps_low`` / ``eps_high`` are log-space bounds (default 0.4 each, GMPO's setting).
``loss_agg_mode`` is not used; micro-batch D = number of rows.

GEPO and SNIS need ``group_index`` [B] (the prompt group of each row, GRPO's n samples per
prompt) and whole groups inside every loss call: a group split across micro-batches silently
changes the normaliser, so pass ``group_size`` to have it checked.

GEPO (arXiv 2508.17850, authors' code yelurebajrang/HeteroRL_GEPO)::

    q_i = exp(mean_t m log mu_it),  p_i = exp(mean_t m log pi_it)      (geometric-mean probabilities)
    E_q[q]_g = sum_{j in g} q_j^2 / sum_{j in g} q_j                  (detached)
    w_i = p_i / E_q[q]_g(i)          (computed as exp(clamp(log p_i - log E_q[q], -20, 20)))
    l_i = -min(w_i A_i, clip(w_i, 1 - eps_low, 1 + eps_high) A_i)
    loss = mean over groups of (mean over the group's non-empty rows of l_i)

The authors' trainer takes E_q over the whole per-device batch and averages l_i over rows;
we use the prompt group as the paper defines it (equal when a batch is one group, and the
row mean equals the group mean for equal group sizes). TIS weights multiply l_i by their
per-row geometric mean (as verl's GMPO does). Micro-batch D = number of non-empty groups.

SNIS, self-normalised sequence-level importance sampling within each group::

    log W_i = VESPO's detached log W (sum of clamped token log-ratios [+ log TIS], clamp +-20)
    w^_i    = n_g W_i / sum_{j in g} W_j       (softmax in log space; mean 1 within a group)
    l_it    = -w^_i A_i log pi_it,  reduced with loss_agg_mode (default token-mean)

SNIS estimates E_pi[A grad log pi] from samples of mu without the unknown normalising
constant: consistent with O(1/n) bias, and scale-free in W (no clamping of W's size needed
beyond the exp safety bound). On-policy (W = 1) it is exactly GPG. Requirements: (1) whole
groups in every mini-batch *and* loss call, since the normaliser sums over the group; (2) the
weights are recomputed from the current log-probs after every optimizer update (this loss
does so on every call; never cache w^ across mini-batches).

Shapes: log_prob, old_log_prob, response_mask, rollout_is_weights [B, T]; advantages [B] or
row-constant [B, T]; group_index [B] (gepo, snis).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron_vespo.losses.aggregation import agg_loss, divide_by_denominator, masked_row_sum
from megatron_vespo.losses.inputs import PolicyLossInput
from megatron_vespo.losses.metrics import clip_fraction, ess, kl_metrics, masked_mean, masked_stats, seq_stats
from megatron_vespo.losses.registry import register_loss
from megatron_vespo.losses.vespo import sequence_log_weight

logger = logging.getLogger(__name__)
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


def group_sum(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[G] sum of [B] ``values`` per dense group id."""
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, group, values)


def group_logsumexp(values: torch.Tensor, valid: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[G] log sum_{j in g, valid} exp(values_j); -inf for groups without valid rows."""
    neg_inf = torch.full((), float("-inf"), dtype=values.dtype, device=values.device)
    v = torch.where(valid, values, neg_inf)
    gmax = torch.full((num_groups,), float("-inf"), dtype=values.dtype, device=values.device)
    gmax = gmax.scatter_reduce(0, group, v, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
    sums = group_sum(torch.exp(v - shift[group]), group, num_groups)
    return torch.log(sums) + shift


def _check_groups(x: PolicyLossInput, group_size: Optional[int], name: str) -> None:
    counts = torch.bincount(x.group_index, minlength=x.num_groups)
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        bad = torch.nonzero(counts != group_size).flatten()
        if bad.numel():
            raise ValueError(f"loss '{name}': {bad.numel()} group(s) have a row count other than group_size="
                             f"{group_size} (e.g. {int(counts[bad[0]])} rows): groups must not be split across "
                             "micro-batches")
    elif x.num_groups == x.log_prob.shape[0] and x.num_groups > 1:
        logger.warning("loss '%s': every group_index is distinct (one row per group), so the group "
                       "normaliser is trivial; were groups split across micro-batches?", name)


@register_loss("gepo", default_agg_mode=None, reduction="groups", sequence_level=True, needs_group=True)
def gepo_loss(
    x: PolicyLossInput,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    group_size: Optional[int] = None,
) -> tuple[torch.Tensor, dict]:
    """GEPO: PPO clip on p_i / E_q[q] with the group-expected behaviour probability, mean over groups."""
    if clip_ratio_low < 0 or clip_ratio_high < 0:
        raise ValueError(f"clip_ratio_low / clip_ratio_high must be >= 0, got {clip_ratio_low} / {clip_ratio_high}")
    _check_groups(x, group_size, "gepo")
    g, num_groups, rows = x.group_index, x.num_groups, x.nonempty
    n = x.lengths.clamp(min=1)
    log_q = masked_row_sum(x.old_log_prob, x.valid) / n
    log_p = masked_row_sum(x.log_prob, x.valid) / n
    with torch.no_grad():
        # log E_q[q] = log sum q^2 - log sum q, in log space so tiny/huge q never under/overflow.
        log_eq = group_logsumexp(2.0 * log_q, rows, g, num_groups) - group_logsumexp(log_q, rows, g, num_groups)
        log_eq_rows = torch.where(rows, log_eq[g], torch.zeros_like(log_q))
    w = torch.exp((log_p - log_eq_rows).clamp(-LOG_CLAMP, LOG_CLAMP))
    adv = x.advantages[:, 0]
    loss1 = -w * adv
    loss2 = -w.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high) * adv
    seq_loss = torch.maximum(loss1, loss2)
    if x.rollout_is_weights is not None:
        log_tis = torch.log(x.rollout_is_weights + 1e-10)
        seq_loss = seq_loss * torch.exp(masked_row_sum(log_tis, x.valid) / n)
    seq_loss = torch.where(rows, seq_loss, torch.zeros_like(seq_loss))
    count = group_sum(rows.to(seq_loss.dtype), g, num_groups)
    group_mean = group_sum(seq_loss, g, num_groups) / count.clamp(min=1)
    loss = divide_by_denominator(group_mean.sum(), x.global_denominator, int((count > 0).sum()))
    with torch.no_grad():
        log_ratio = (x.log_prob.detach() - x.old_log_prob).clamp(-LOG_CLAMP, LOG_CLAMP)
        m = seq_stats("gepo/w", w.detach(), rows)
        m["clipfrac"] = masked_mean((loss2 > loss1).to(w.dtype), rows)
        m["gepo/num_groups"] = float(int((count > 0).sum()))
        m.update(masked_stats("ratio", torch.exp(log_ratio), x.valid))
        m.update(kl_metrics(log_ratio, x.valid))
    return loss, m


@register_loss("snis", default_agg_mode="token-mean", sequence_level=True, needs_group=True)
def snis_loss(
    x: PolicyLossInput,
    *,
    group_size: Optional[int] = None,
) -> tuple[torch.Tensor, dict]:
    """SNIS: REINFORCE weighted by the group-self-normalised sequence ratio n_g W_i / sum_g W."""
    _check_groups(x, group_size, "snis")
    g, num_groups, rows = x.group_index, x.num_groups, x.nonempty
    log_w, log_ratio, _ = sequence_log_weight(x)
    with torch.no_grad():
        lse = group_logsumexp(log_w, rows, g, num_groups)
        n_g = group_sum(rows.to(log_w.dtype), g, num_groups)
        prob = torch.where(rows, torch.exp(log_w - torch.where(rows, lse[g], torch.zeros_like(log_w))),
                           torch.zeros_like(log_w))
        w_hat = torch.where(rows, n_g[g] * prob, torch.ones_like(log_w))
    seq_adv = x.advantages[:, 0]
    coef = (w_hat * seq_adv).unsqueeze(-1)
    loss = agg_loss(-coef * x.log_prob, x.valid, x.loss_agg_mode, x.global_denominator)
    with torch.no_grad():
        m = seq_stats("snis/w", torch.exp(log_w), rows)
        m.update(seq_stats("snis/w_hat", w_hat, rows))
        m["snis/ess"] = ess(torch.exp(log_w), rows)
        # Per-group normalised ESS 1 / (n_g sum p^2), averaged over groups that have rows.
        ess_g = 1.0 / (n_g * group_sum(prob.square(), g, num_groups)).clamp(min=1e-30)
        m["snis/group_ess_mean"] = masked_mean(ess_g, n_g > 0)
        m.update(kl_metrics(log_ratio, x.valid))
    return loss, m
