"""GEPO against the GEPO authors' trainer, and the two deliberate differences pinned.

Reference: HanlardResearch/HeteroRL_GEPO, ``src/hetero_rl/learner_script_checkpoint.py``
(``_compute_loss``, loss_type "gepo"): per row q_i = exp(mean_t log mu), p_i = exp(mean_t log pi)
with the token count clamped at 1; E_qQ = sum_i (q_i / sum_j q_j) q_i over the whole (per-device)
batch; loss_i = -min(p_i / E_qQ * A_i, clip(p_i / E_qQ, 1 - eps_lo, 1 + eps_hi) * A_i); loss = mean_i.
``reference_gepo`` below re-derives those formulas; it is run once per prompt group and the group
losses are averaged, which is what our per-group GEPO computes.

Differences (docs/losses.md, "Differences from the references"):
* a fully masked row: the reference gives it q = p = exp(0) = 1 and loss -A (the clamp(min=1) of an
  empty row), counted in E_qQ and in the mean; we exclude it from both (pinned below);
* rollout-IS weights: the reference has no such input (its q is the sampler's own probability, i.e.
  our ``old_log_prob_source=rollout``); with recomputed old log-probs plus TIS/MIS weights we keep
  q from pi_old and multiply each row's loss by its geometric-mean weight, as gmpo does (pinned).
"""

from __future__ import annotations

import math

import torch

from megatron_vespo.losses import compute_policy_loss

EPS_LO, EPS_HI = 0.2, 0.2


def reference_gepo(logp: torch.Tensor, mu_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The authors' GEPO loss for one batch ([B, T] tensors, [B] advantages)."""
    m = mask.to(logp.dtype)
    n = m.sum(1).clamp(min=1.0)
    q = ((mu_logp * m).sum(1) / n).exp()
    p = ((logp * m).sum(1) / n).exp()
    e_qq = ((q / q.sum()) * q).sum()
    w = p / e_qq
    return (-torch.minimum(w * adv, w.clamp(1 - EPS_LO, 1 + EPS_HI) * adv)).mean()


def _groups(G=3, size=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = G * size
    logp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2 + 0.1)
    old = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    group = torch.arange(B) // size
    return logp, old, adv, mask, group


def _ours(logp, old, adv, mask, group, **kw):
    loss, _ = compute_policy_loss("gepo", log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask,
                                  group_index=group, clip_ratio_low=EPS_LO, clip_ratio_high=EPS_HI, **kw)
    return loss


def _reference_per_group(logp, mu, adv, mask, group):
    losses = [reference_gepo(logp[group == k], mu[group == k], adv[group == k], mask[group == k])
              for k in group.unique()]
    return torch.stack(losses).mean()


def test_matches_authors_gepo_run_once_per_group():
    logp, old, adv, mask, group = _groups()
    ours, ref = _ours(logp, old, adv, mask, group), _reference_per_group(logp, old, adv, mask, group)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


def test_fully_masked_row_is_excluded_not_counted_as_q_equal_one():
    logp, old, adv, mask, group = _groups(seed=1)
    mask[1] = False  # row 1 of group 0 is fully masked
    ours = _ours(logp, old, adv, mask, group)
    keep = torch.ones(len(adv), dtype=torch.bool)
    keep[1] = False
    # our rule: the row does not exist (same as the reference run on the batch without it)
    torch.testing.assert_close(ours, _reference_per_group(logp[keep], old[keep], adv[keep], mask[keep], group[keep]),
                               rtol=1e-12, atol=1e-14)
    # the reference's rule differs: q = p = 1 and loss -A for that row
    ref_with_row = _reference_per_group(logp, old, adv, mask, group)
    assert not math.isclose(float(ours), float(ref_with_row), rel_tol=1e-3)


def test_rollout_is_weights_scale_rows_by_geometric_mean_weight():
    logp, old, adv, mask, group = _groups(seed=2)
    g = torch.Generator().manual_seed(5)
    w = torch.exp(0.3 * torch.randn(mask.shape, generator=g, dtype=torch.float64)) * mask
    ours = _ours(logp, old, adv, mask, group, rollout_is_weights=w)
    # pinned: per-row loss of the reference with q from pi_old, times exp(mean_t log w_t)
    m = mask.to(torch.float64)
    geo = (((w + 1e-10).log() * m).sum(1) / m.sum(1)).exp()
    total = []
    for k in group.unique():
        s = group == k
        n = m[s].sum(1)
        q = ((old[s] * m[s]).sum(1) / n).exp()
        p = ((logp[s] * m[s]).sum(1) / n).exp()
        r = p / ((q / q.sum()) * q).sum()
        row = -torch.minimum(r * adv[s], r.clamp(1 - EPS_LO, 1 + EPS_HI) * adv[s])
        total.append((row * geo[s]).mean())
    torch.testing.assert_close(ours, torch.stack(total).mean(), rtol=1e-12, atol=1e-14)
    # the reference fed the behaviour log-probs mu = pi_old / w instead is a different estimator
    mu = old - (w + 1e-10).log()
    assert not math.isclose(float(ours), float(_reference_per_group(logp, mu, adv, mask, group)), rel_tol=1e-3)
