r"""PSIS: Pareto-smoothed sequence importance weights, with the k-hat reliability diagnostic.

Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman, Yao, Gabry, "Pareto Smoothed
Importance Sampling", JMLR 2024; arXiv 1507.02646) replaces the M largest of n importance weights,
M = floor(min(n / 5, 3 sqrt(n))), by the expected order statistics of a generalised Pareto
distribution (GPD) fitted to them, and reports the fitted shape k-hat: k-hat < 0.5 the raw weights
have finite variance, 0.5..0.7 the smoothed estimate is still usable, > 0.7 the weights are
unreliable (the estimate may be far off whatever is done to it).

Per call, with sequence weights log W_i exactly as VESPO's (sum of clamped token log-ratios
[+ log TIS], clamped to +-20; detached)::

    u          = the (M+1)-th largest W (threshold);  tail = the M rows with W > u
    (k, sigma) = GPD fit to W_tail - u  (Zhang & Stephens 2009, with the weakly informative prior
                 on k of Vehtari et al.: k <- (M k + 5) / (M + 10))
    W~_tail    = u + F^{-1}((j - 1/2) / M; k, sigma) in the tail's rank order, capped at max W
    w^_i       = n W~_i / sum_j W~_j  (self-normalised over the call's non-empty rows; optional)
    loss_it    = -w^_i A_i log pi_it, reduced with loss_agg_mode (default token-mean)

Weights at or below the threshold are unchanged (before normalisation). Too few rows for a tail
(M < 5) leaves every weight raw and reports k-hat = inf, as the reference implementations do.
Guard: when k-hat > ``khat_threshold`` the loss is multiplied by ``guard_scale`` (0 skips the update's
gradient); the default threshold inf never triggers. As for SNIS, the tail is fitted on the rows of
one call (a micro-batch under the Megatron actor).

Shapes: log_prob, old_log_prob, response_mask, rollout_is_weights [B, T]; advantages [B] or
row-constant [B, T]; W, W~ [B].
"""

from __future__ import annotations

import math

import torch

from megatron_vespo.losses.aggregation import agg_loss
from megatron_vespo.losses.inputs import PolicyLossInput
from megatron_vespo.losses.metrics import ess, kl_metrics, seq_stats
from megatron_vespo.losses.registry import register_loss
from megatron_vespo.losses.vespo import sequence_log_weight

PRIOR_K_WEIGHT = 10.0  # Vehtari et al.: k's weakly informative prior, worth 10 observations at k = 0.5
MIN_TAIL = 5


def tail_length(n: int) -> int:
    """M = floor(min(n / 5, 3 sqrt(n))): the number of largest weights PSIS smooths (arviz-stats' rule)."""
    return int(math.floor(min(0.2 * n, 3.0 * math.sqrt(n))))


def fit_gpd(exceedances: torch.Tensor) -> tuple[float, float]:
    """(k, sigma) of a generalised Pareto fit to sorted positive ``exceedances`` (float64, ascending).

    The profile-likelihood posterior-mean estimator of Zhang & Stephens (2009, Technometrics 51)
    over a grid of ``30 + sqrt(M)`` values of b = -k / sigma, then the prior on k above.
    """
    x = exceedances.double()
    n = x.numel()
    grid = 30 + int(math.sqrt(n))
    j = torch.arange(1, grid + 1, dtype=torch.float64)
    quartile = x[max(int(n / 4 + 0.5) - 1, 0)]
    b = (1.0 - torch.sqrt(grid / (j - 0.5))) / (3.0 * quartile) + 1.0 / x[-1]
    k_of_b = torch.log1p(-b[:, None] * x[None, :]).mean(dim=1)  # [grid]: the shape that goes with each b
    profile = n * (torch.log(-b / k_of_b) - k_of_b - 1.0)  # log-likelihood profile
    post = torch.softmax(profile, dim=0)  # posterior weights over the grid (normalised in log space)
    b_hat = float((post * b).sum())
    # mean log(1 - b x) is the shape in the usual sign convention (F = 1 - (1 + k x / sigma)^(-1/k));
    # Zhang & Stephens' own k is its negative
    k_hat = float(torch.log1p(-b_hat * x).mean())
    sigma = -k_hat / b_hat
    k_hat = (n * k_hat + PRIOR_K_WEIGHT * 0.5) / (n + PRIOR_K_WEIGHT)
    return k_hat, sigma


def gpd_quantile(p: torch.Tensor, k: float, sigma: float) -> torch.Tensor:
    """Inverse CDF of GPD(k, sigma) at probabilities ``p`` in (0, 1)."""
    if abs(k) < 1e-12:
        return -sigma * torch.log1p(-p)
    return sigma * torch.expm1(-k * torch.log1p(-p)) / k


def psis_smooth(log_w: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Pareto-smooth the weights exp(``log_w``) of ``rows``; returns (smoothed log W [B], k-hat).

    Computed relative to the largest weight (exp never overflows); rows outside ``rows`` keep their value.
    """
    out = log_w.detach().double().clone()
    idx = torch.nonzero(rows, as_tuple=False).flatten()
    n = idx.numel()
    m = tail_length(n) if n else 0
    if m < MIN_TAIL or n <= m:
        return out.to(log_w.dtype), math.inf
    lw = out[idx]
    top = lw.max()
    order = torch.argsort(lw)
    threshold = lw[order[n - m - 1]]
    tail = order[n - m:]  # the m largest, ascending
    exc = torch.exp(lw[tail] - top) - torch.exp(threshold - top)
    if not bool((exc > 0).all()):  # ties at the threshold: nothing to fit
        return out.to(log_w.dtype), math.inf
    k_hat, sigma = fit_gpd(exc)
    if not (math.isfinite(k_hat) and sigma > 0):
        return out.to(log_w.dtype), math.inf
    p = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    smoothed = gpd_quantile(p, k_hat, sigma) + torch.exp(threshold - top)
    smoothed = torch.log(smoothed).clamp(max=0.0) + top  # capped at the largest raw weight
    lw[tail] = smoothed
    out[idx] = lw
    return out.to(log_w.dtype), k_hat


@register_loss("psis", default_agg_mode="token-mean", sequence_level=True, call_statistics=True)
def psis_loss(
    x: PolicyLossInput,
    *,
    self_normalize: bool = True,
    khat_threshold: float = math.inf,
    guard_scale: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """REINFORCE weighted by Pareto-smoothed sequence weights; k-hat reported, optional guard."""
    if guard_scale < 0:
        raise ValueError(f"guard_scale must be >= 0, got {guard_scale}")
    log_w, log_ratio, _ = sequence_log_weight(x)
    rows = x.nonempty
    with torch.no_grad():
        log_ws, k_hat = psis_smooth(log_w, rows)
        w_s = torch.exp(log_ws)
        if self_normalize and bool(rows.any()):
            lw_rows = torch.where(rows, log_ws, torch.full_like(log_ws, -math.inf))
            w_s = torch.exp(log_ws - torch.logsumexp(lw_rows, 0)) * rows.sum()
        w_s = torch.where(rows, w_s, torch.zeros_like(w_s))
        # k-hat is inf when no tail could be fitted (ties, e.g. every W = 1 on-policy, or too few rows):
        # equal weights are not unreliable ones, so only a fitted tail can trip the guard
        fitted = math.isfinite(k_hat)
        guarded = fitted and k_hat > khat_threshold  # the default threshold (inf) never guards
    seq_adv = x.seq_advantages()
    coef = (w_s * seq_adv).unsqueeze(-1)
    loss = agg_loss(-coef * x.log_prob, x.valid, x.loss_agg_mode, x.global_denominator)
    if guarded:
        loss = loss * guard_scale
    with torch.no_grad():
        m = seq_stats("psis/w_raw", torch.exp(log_w), rows)
        m.update(seq_stats("psis/w_smoothed", w_s, rows))
        m["psis/tail_fitted"] = float(fitted)
        if math.isfinite(k_hat):  # no tail (fewer than 5 rows in it): no k-hat to report
            m["psis/khat"] = k_hat
        m["psis/khat_gt_0_7"] = float(fitted and k_hat > 0.7)
        m["psis/guarded"] = float(guarded)
        m["psis/ess_raw"] = ess(torch.exp(log_w - log_w.max()), rows)
        m["psis/ess_smoothed"] = ess(w_s, rows)
        m.update(kl_metrics(log_ratio, x.valid))
    return loss, m
