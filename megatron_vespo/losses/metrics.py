"""Metric helpers shared by the losses; everything runs under ``no_grad``.

Losses collect 0-d tensors in a dict and call :func:`to_floats` once at the end, so a
metric dict costs one device-to-host copy rather than one sync per entry.

KL estimators (samples come from the behaviour policy mu = pi_old, r = pi/mu per token):

* ``approx_kl``: k1 = mean over valid tokens of (log mu - log pi), verl's ``ppo_kl``.
* ``approx_kl_k3``: k3 = mean of (r - 1 - log r), Schulman's low-variance, always >= 0
  estimator of KL(mu || pi) (the same formula as verl's ``low_var_kl``, there applied to
  the reference policy), computed from the [-20, 20]-clamped log-ratio.
"""

from __future__ import annotations

from typing import Mapping, Union

import torch

from megatron_vespo.losses.aggregation import masked_mean

MetricValue = Union[torch.Tensor, float, int]


def to_floats(metrics: Mapping[str, MetricValue]) -> dict[str, float]:
    """Convert a dict of 0-d tensors / numbers to python floats with a single host copy."""
    keys = list(metrics)
    tensors = [k for k in keys if isinstance(metrics[k], torch.Tensor)]
    out: dict[str, float] = {k: float(metrics[k]) for k in keys if not isinstance(metrics[k], torch.Tensor)}
    if tensors:
        stacked = torch.stack([metrics[k].detach().reshape(()).to(torch.float64) for k in tensors])
        out.update(zip(tensors, stacked.cpu().tolist()))
    return {k: out[k] for k in keys}


def kl_metrics(log_ratio: torch.Tensor, valid: torch.Tensor,
               ratio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """k1 and k3 KL estimates from the clamped per-token log-ratio log(pi/mu) [B, T].

    ``ratio`` = exp(log_ratio) may be passed when the loss already computed it.
    """
    with torch.no_grad():
        if ratio is None:
            ratio = torch.exp(log_ratio)
        return {
            "approx_kl": masked_mean(-log_ratio, valid),
            "approx_kl_k3": masked_mean(ratio - 1.0 - log_ratio, valid),
        }


def masked_stats(prefix: str, values: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{prefix}_mean/_max/_min`` over the true entries of ``valid`` (0 when there are none)."""
    with torch.no_grad():
        any_valid = valid.any()
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        big = torch.finfo(values.dtype).max
        vmax = torch.where(valid, values, torch.full((), -big, dtype=values.dtype, device=values.device)).amax()
        vmin = torch.where(valid, values, torch.full((), big, dtype=values.dtype, device=values.device)).amin()
        return {
            f"{prefix}_mean": masked_mean(values, valid),
            f"{prefix}_max": torch.where(any_valid, vmax, zero),
            f"{prefix}_min": torch.where(any_valid, vmin, zero),
        }


def seq_stats(prefix: str, values: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean/max/min/std of a [B] vector over the true entries of ``valid`` [B] (unbiased std, 0 if < 2)."""
    with torch.no_grad():
        out = masked_stats(prefix, values, valid)
        n = valid.sum()
        centred = torch.where(valid, values - out[f"{prefix}_mean"], torch.zeros((), dtype=values.dtype,
                                                                                   device=values.device))
        var = centred.square().sum() / (n - 1).clamp(min=1).to(values.dtype)
        out[f"{prefix}_std"] = torch.where(n > 1, var.sqrt(), torch.zeros((), dtype=values.dtype,
                                                                          device=values.device))
        return out


def ess(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Normalised effective sample size (sum w)^2 / (n sum w^2) of [B] weights over ``valid`` rows, in [0, 1]."""
    with torch.no_grad():
        w = torch.where(valid, weights, torch.zeros((), dtype=weights.dtype, device=weights.device)).to(torch.float64)
        n = valid.sum().clamp(min=1)
        denom = w.square().sum() * n
        return torch.where(denom > 0, w.sum().square() / denom.clamp(min=1e-300), torch.zeros((), dtype=w.dtype,
                                                                                                device=w.device))


def clip_fraction(clipped: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Fraction of valid tokens where ``clipped`` (bool [B, T]) holds."""
    with torch.no_grad():
        return masked_mean(clipped.to(torch.float32), valid)
