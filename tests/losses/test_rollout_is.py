"""TIS / MIS weights from rollout vs training log-probs (verl rollout_corr_helper semantics)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vespo.losses import compute_policy_loss, compute_rollout_is_weights
from megatron_vespo.losses.config import RolloutISConfig


def _data(seed=0, B=6, T=8, scale=0.6):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    roll = old + scale * torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([8, 0, 3, 5, 1, 8])[:B]
    mask = torch.arange(T) < lengths.unsqueeze(1)
    return old, roll, mask


def _naive(old, roll, mask, level, mode, thr, lower):
    B, T = old.shape
    w = torch.zeros(B, T, dtype=old.dtype)
    keep = torch.zeros(B, T, dtype=old.dtype)
    for i in range(B):
        seq = sum(min(max(old[i, t].item() - roll[i, t].item(), -20), 20) for t in range(T) if mask[i, t])
        for t in range(T):
            if not mask[i, t]:
                continue
            lw = min(max(seq, -20), 20) if level == "sequence" else min(max(old[i, t].item() - roll[i, t].item(),
                                                                             -20), 20)
            raw = math.exp(lw)
            if mode == "truncate":
                w[i, t], keep[i, t] = min(raw, thr), 1.0
            else:
                ok = lower <= raw <= thr
                w[i, t], keep[i, t] = (raw if ok else 0.0), float(ok)
    return w, keep


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("lower", [None, 0.3])
def test_weights_and_mask_match_the_definition(level, mode, lower):
    old, roll, mask = _data()
    cfg = RolloutISConfig(enabled=True, level=level, mode=mode, threshold=1.5, lower=lower)
    res = compute_rollout_is_weights(old.requires_grad_(True), roll, mask, cfg)
    w, keep = _naive(old.detach(), roll, mask, level, mode, 1.5, lower if lower is not None else 1 / 1.5)
    torch.testing.assert_close(res.weights, w, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.mask, keep, rtol=0, atol=0)
    assert not res.weights.requires_grad
    assert all(type(v) is float and math.isfinite(v) for v in res.metrics.values())
    assert res.metrics["rollout_is/masked_frac"] == pytest.approx(float(1 - keep[mask].mean()))
    if mode == "mask" and level == "sequence":
        assert ((keep.sum(-1) == 0) | (keep.sum(-1) == mask.sum(-1))).all(), "sequence MIS drops whole rows"
        assert 0 < res.metrics["rollout_is/seq_masked_frac"] < 1


def test_disabled_returns_no_weights():
    old, roll, mask = _data()
    res = compute_rollout_is_weights(old, roll, mask, RolloutISConfig())
    assert res.weights is None and torch.equal(res.mask, mask.double()) and res.metrics == {}


def test_bad_inputs_are_named():
    old, roll, mask = _data()
    on = RolloutISConfig(enabled=True)
    with pytest.raises(ValueError, match=r"rollout_log_prob has shape \(6, 7\)"):
        compute_rollout_is_weights(old, roll[:, :-1], mask, on)
    with pytest.raises(ValueError, match="rollout_log_prob has dtype torch.float32"):
        compute_rollout_is_weights(old, roll.float(), mask, on)
    with pytest.raises(ValueError, match=r"lower \(3.0\) exceeds rollout_is.threshold \(2.0\)"):
        compute_rollout_is_weights(old, roll, mask, RolloutISConfig(enabled=True, lower=3.0))
    bad = roll.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="rollout_log_prob contains NaN"):
        compute_rollout_is_weights(old, bad, mask, on)


def test_vespo_with_untruncated_weights_equals_vespo_against_the_rollout_policy():
    """W = (pi/pi_old)(pi_old/pi_rollout) = pi/pi_rollout: folding TIS into log W is exact."""
    old, roll, mask = _data(scale=0.2)
    lp = (old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3),
                                  dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3, 2.0, -2.0], dtype=torch.float64)
    res = compute_rollout_is_weights(old, roll, mask, RolloutISConfig(enabled=True, threshold=1e6))
    with_tis, m = compute_policy_loss("vespo", log_prob=lp, old_log_prob=old, advantages=adv, response_mask=mask,
                                      rollout_is_weights=res.weights)
    direct, _ = compute_policy_loss("vespo", log_prob=lp, old_log_prob=roll, advantages=adv, response_mask=mask)
    assert with_tis.item() == pytest.approx(direct.item(), rel=1e-12)
    assert m["vespo/tis_enabled"] == 1.0 and "vespo/log_tis_mean" in m
