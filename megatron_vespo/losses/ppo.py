r"""Token-ratio baselines: GRPO/PPO dual-clip, GSPO, SAPO, CISPO and GPG.

Reference: verl ``verl/trainer/ppo/core_algos.py`` as vendored in FloyedShen/VESPO (the
VESPO authors' baselines). All use r_t = pi_t / mu_t = exp(clamp(log pi_t - log mu_t, -20, 20))
unless stated; TIS/MIS weights w_t (if given) multiply the *ratio* for grpo, gspo and sapo
(the VESPO fork's placement; upstream verl multiplies the loss) and the *loss* for cispo, gpg.

* ``grpo`` (PPO clip + dual clip, Schulman 2017 / Ye 2019 arXiv 1912.09729, DeepSeekMath GRPO)::

      l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  if A < 0: l = min(l, -A c)

* ``gspo`` (arXiv 2507.18071), sequence ratio with token gradient (GSPO-token)::

      log s_t = log pi_t - sg(log pi_t) + sg(mean_t m (log pi - log mu)),  clamp(max=10)
      l = max(-A s, -A clip(s, 1 - eps_low, 1 + eps_high))       default agg seq-mean-token-mean

* ``sapo`` (arXiv 2511.20347), soft gate instead of a hard clip::

      l = -A (4 / tau) sigmoid(tau (r - 1)),  tau = tau_pos if A > 0 else tau_neg

* ``cispo`` (MiniMax-M1, arXiv 2506.13585): ``l = -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi``
* ``gpg`` (arXiv 2504.02546): ``l = -A log pi``, the plain on-policy policy gradient.

Shapes: log_prob, old_log_prob, response_mask, rollout_is_weights [B, T]; advantages [B, T] or [B].
"""

from __future__ import annotations

import torch

from megatron_vespo.losses.aggregation import agg_loss, masked_row_sum
from megatron_vespo.losses.inputs import PolicyLossInput
from megatron_vespo.losses.metrics import clip_fraction, kl_metrics, masked_stats
from megatron_vespo.losses.registry import register_loss

LOG_CLAMP = 20.0


def _clamped_log_ratio(x: PolicyLossInput) -> torch.Tensor:
    return (x.log_prob - x.old_log_prob).clamp(-LOG_CLAMP, LOG_CLAMP)


def _check_clip(low: float, high: float) -> None:
    if low < 0 or high < 0:
        raise ValueError(f"clip_ratio_low / clip_ratio_high must be >= 0, got {low} / {high}")


def _ratio_metrics(x: PolicyLossInput, log_ratio: torch.Tensor, ratio: torch.Tensor) -> dict:
    with torch.no_grad():
        m = masked_stats("ratio", ratio, x.valid)
        m.update(kl_metrics(log_ratio.detach(), x.valid, ratio.detach()))
        return m


@register_loss("grpo", default_agg_mode="token-mean")
def grpo_loss(
    x: PolicyLossInput,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float = 3.0,
) -> tuple[torch.Tensor, dict]:
    """GRPO / PPO: clipped token ratio with dual clip for negative advantages (verl ``vanilla``)."""
    _check_clip(clip_ratio_low, clip_ratio_high)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for dual-clip PPO, got {clip_ratio_c}")
    log_ratio = _clamped_log_ratio(x)
    ratio = torch.exp(log_ratio)
    plain_ratio = ratio
    if x.rollout_is_weights is not None:
        ratio = ratio * x.rollout_is_weights
    adv = x.advantages
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped = torch.maximum(loss1, loss2)
    loss3 = -adv * clip_ratio_c
    token_loss = torch.where(adv < 0, torch.minimum(loss3, clipped), clipped)
    loss = agg_loss(token_loss, x.valid, x.loss_agg_mode, x.global_denominator)
    m = _ratio_metrics(x, log_ratio, plain_ratio)
    with torch.no_grad():
        m["clipfrac"] = clip_fraction(loss2 > loss1, x.valid)
        m["clipfrac_lower"] = clip_fraction((clipped > loss3) & (adv < 0), x.valid)
    return loss, m


@register_loss("gspo", default_agg_mode="seq-mean-token-mean")
def gspo_loss(
    x: PolicyLossInput,
    *,
    clip_ratio_low: float = 3e-4,
    clip_ratio_high: float = 4e-4,
) -> tuple[torch.Tensor, dict]:
    """GSPO: PPO clip on the length-normalised sequence ratio, gradient through each token."""
    _check_clip(clip_ratio_low, clip_ratio_high)
    # verl does not clamp the GSPO log-ratio; the sequence mean is clamped (max=10) instead.
    delta = x.log_prob - x.old_log_prob
    seq_mean = masked_row_sum(delta.detach(), x.valid) / x.lengths.clamp(min=1)
    log_s = (x.log_prob - x.log_prob.detach() + seq_mean.unsqueeze(-1)).clamp(max=10.0)
    s = torch.exp(log_s)
    if x.rollout_is_weights is not None:
        s = s * x.rollout_is_weights
    loss1 = -x.advantages * s
    loss2 = -x.advantages * s.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    token_loss = torch.maximum(loss1, loss2)
    loss = agg_loss(token_loss, x.valid, x.loss_agg_mode, x.global_denominator)
    with torch.no_grad():
        log_ratio = delta.detach().clamp(-LOG_CLAMP, LOG_CLAMP)
        m = _ratio_metrics(x, log_ratio, torch.exp(log_ratio))
        m.update(masked_stats("seq_ratio", torch.exp(seq_mean.clamp(max=10.0)), x.nonempty))
        m["clipfrac"] = clip_fraction(loss2 > loss1, x.valid)
    return loss, m


@register_loss("sapo", default_agg_mode="seq-mean-token-mean")
def sapo_loss(
    x: PolicyLossInput,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[torch.Tensor, dict]:
    """SAPO: soft sigmoid gate (4/tau) sigmoid(tau (r - 1)) in place of the hard PPO clip."""
    if not (tau_pos > 0 and tau_neg > 0):
        raise ValueError(f"tau_pos and tau_neg must be > 0, got {tau_pos} / {tau_neg}")
    log_ratio = _clamped_log_ratio(x)
    ratio = torch.exp(log_ratio)
    plain_ratio = ratio
    if x.rollout_is_weights is not None:
        ratio = ratio * x.rollout_is_weights
    dtype, dev = ratio.dtype, ratio.device
    tau = torch.where(x.advantages > 0, torch.tensor(tau_pos, dtype=dtype, device=dev),
                      torch.tensor(tau_neg, dtype=dtype, device=dev))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = agg_loss(-gate * x.advantages, x.valid, x.loss_agg_mode, x.global_denominator)
    m = _ratio_metrics(x, log_ratio, plain_ratio)
    with torch.no_grad():
        # d gate / d r = 4 sigmoid (1 - sigmoid): 1 at r = 1, the effective per-token gradient weight.
        sg = torch.sigmoid(tau * (ratio - 1.0))
        m.update(masked_stats("gate_grad", 4.0 * sg * (1.0 - sg), x.valid))
    return loss, m


@register_loss("cispo", default_agg_mode="token-mean")
def cispo_loss(
    x: PolicyLossInput,
    *,
    clip_ratio_low: float = 10.0,
    clip_ratio_high: float = 0.2,
) -> tuple[torch.Tensor, dict]:
    """CISPO: REINFORCE weighted by the detached clipped token ratio (no lower bound by default)."""
    _check_clip(clip_ratio_low, clip_ratio_high)
    log_ratio = _clamped_log_ratio(x)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    token_loss = -clipped.detach() * x.advantages * x.log_prob
    if x.rollout_is_weights is not None:
        token_loss = token_loss * x.rollout_is_weights
    loss = agg_loss(token_loss, x.valid, x.loss_agg_mode, x.global_denominator)
    m = _ratio_metrics(x, log_ratio, ratio)
    with torch.no_grad():
        m["clipfrac"] = clip_fraction(ratio != clipped, x.valid)
    return loss, m


@register_loss("gpg", default_agg_mode="token-mean")
def gpg_loss(x: PolicyLossInput) -> tuple[torch.Tensor, dict]:
    """GPG: the plain policy gradient -A log pi (no importance ratio)."""
    token_loss = -x.log_prob * x.advantages
    if x.rollout_is_weights is not None:
        token_loss = token_loss * x.rollout_is_weights
    loss = agg_loss(token_loss, x.valid, x.loss_agg_mode, x.global_denominator)
    with torch.no_grad():
        log_ratio = (x.log_prob.detach() - x.old_log_prob).clamp(-LOG_CLAMP, LOG_CLAMP)
        m = _ratio_metrics(x, log_ratio, torch.exp(log_ratio))
    return loss, m
