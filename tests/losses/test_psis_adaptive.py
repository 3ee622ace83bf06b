"""PSIS and adaptive VESPO: reference parity, the properties issue 14 asks for, and their guards."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_vespo.losses import compute_policy_loss
from megatron_vespo.losses.psis import fit_gpd, gpd_quantile, psis_smooth, tail_length
from megatron_vespo.losses.vespo_adaptive import choose_scale, log_ess, log_kernel


def _batch(B=48, T=6, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -(torch.rand(B, T, generator=g, dtype=torch.float64) + 0.1)
    old = logp + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    return logp.requires_grad_(True), old, adv, mask


# ---------------------------------------------------------------- PSIS

@pytest.mark.parametrize("n", [25, 64, 256, 1000])
@pytest.mark.parametrize("df", [1.5, 3.0, 30.0])
def test_psis_matches_arviz_stats(n, df):
    """Smoothed, normalised log weights and k-hat equal arviz-stats' ``_psislw`` (the reference PSIS)."""
    np = pytest.importorskip("numpy")
    base = pytest.importorskip("arviz_stats.base")
    lw = np.random.default_rng(n + int(df)).standard_t(df, size=n) * 2.0
    ref, k_ref = base.array_stats._psislw(-lw, 1.0)  # arviz smooths -input (LOO log-likelihood convention)
    mine, k = psis_smooth(torch.tensor(lw), torch.ones(n, dtype=torch.bool))
    mine = mine - torch.logsumexp(mine, 0)
    assert k == pytest.approx(k_ref, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(mine, torch.tensor(ref), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k_true", [0.2, 0.5, 0.9])
def test_gpd_fit_recovers_the_shape_of_pareto_samples(k_true):
    """k-hat on GPD(k, 2) samples is within sampling error (M = 2000 exceedances: sd ~ (1 + k) / sqrt(M))."""
    g = torch.Generator().manual_seed(int(k_true * 100))
    x = gpd_quantile(torch.rand(2000, generator=g, dtype=torch.float64), k_true, 2.0)
    k_hat, sigma = fit_gpd(torch.sort(x).values)
    assert abs(k_hat - k_true) < 4 * (1 + k_true) / math.sqrt(2000)
    assert sigma == pytest.approx(2.0, rel=0.15)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=25, max_value=400), seed=st.integers(0, 10_000), spread=st.floats(0.1, 6.0))
def test_psis_leaves_weights_below_the_tail_unchanged(n, seed, spread):
    g = torch.Generator().manual_seed(seed)
    lw = spread * torch.randn(n, generator=g, dtype=torch.float64)
    out, k = psis_smooth(lw, torch.ones(n, dtype=torch.bool))
    m = tail_length(n)
    order = torch.argsort(lw)
    body = order[: n - m]
    assert torch.equal(out[body], lw[body])
    assert out.max() <= lw.max() + 1e-12  # smoothed tail capped at the largest raw weight
    assert math.isfinite(k)


def test_psis_without_a_tail_reports_no_khat_and_keeps_weights():
    lw = torch.randn(20, dtype=torch.float64)  # M = 4 < 5
    out, k = psis_smooth(lw, torch.ones(20, dtype=torch.bool))
    assert k == math.inf and torch.equal(out, lw)


def test_psis_loss_guard_skips_unreliable_batches():
    logp, old, adv, mask = _batch(B=64, scale=3.0)
    loss, m = compute_policy_loss("psis", log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask)
    assert m["psis/khat"] > 0.7 and m["psis/guarded"] == 0.0
    guarded, mg = compute_policy_loss("psis", log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask,
                                      khat_threshold=0.7, guard_scale=0.0)
    assert mg["psis/guarded"] == 1.0 and guarded.item() == 0.0
    half, _ = compute_policy_loss("psis", log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask,
                                  khat_threshold=0.7, guard_scale=0.5)
    assert half.item() == pytest.approx(0.5 * loss.item())


def test_psis_on_policy_is_reinforce():
    logp, _, adv, mask = _batch()
    a, _ = compute_policy_loss("psis", log_prob=logp, old_log_prob=logp.detach(), advantages=adv, response_mask=mask)
    b, _ = compute_policy_loss("vespo", log_prob=logp, old_log_prob=logp.detach(), advantages=adv, response_mask=mask)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_psis_guard_never_trips_on_policy():
    """Every W = 1 (on-policy, N = 1): no tail can be fitted (ties), k-hat is inf; a guard at 0.7 used to
    skip every on-policy update and khat_gt_0_7 read 1.0 (found in the staleness sweep's N = 1 cells)."""
    logp, _, adv, mask = _batch(B=64)
    free, _ = compute_policy_loss("psis", log_prob=logp, old_log_prob=logp.detach(), advantages=adv,
                                  response_mask=mask)
    guarded, m = compute_policy_loss("psis", log_prob=logp, old_log_prob=logp.detach(), advantages=adv,
                                     response_mask=mask, khat_threshold=0.7, guard_scale=0.0)
    assert m["psis/tail_fitted"] == 0.0 and m["psis/guarded"] == 0.0 and m["psis/khat_gt_0_7"] == 0.0
    assert guarded.item() == free.item() != 0.0


# ---------------------------------------------------------------- adaptive VESPO

def test_adaptive_equals_vespo_at_w_one_and_when_ess_is_healthy():
    logp, _, adv, mask = _batch()
    on = dict(log_prob=logp, old_log_prob=logp.detach(), advantages=adv, response_mask=mask)
    a, ma = compute_policy_loss("vespo_adaptive", **on)
    v, _ = compute_policy_loss("vespo", **on)
    assert ma["vespo/scale"] == 1.0 and torch.equal(a, v)
    logp, old, adv, mask = _batch(scale=0.02)  # slightly off-policy: the default kernel keeps ESS high
    near = dict(log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask)
    a, ma = compute_policy_loss("vespo_adaptive", **near)
    v, _ = compute_policy_loss("vespo", **near)
    assert ma["vespo/scale"] == 1.0 and torch.equal(a, v)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.floats(0.05, 30.0), target=st.floats(0.05, 0.95),
       n=st.integers(2, 200))
def test_adaptive_scale_meets_the_target_ess_and_is_the_largest(seed, spread, target, n):
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(spread * torch.randn(n, generator=g, dtype=torch.float64)).clamp(max=math.exp(20))
    c1 = torch.where(torch.rand(n, generator=g) > 0.5, 2.0, 3.0).double()
    c2 = 5.0 - c1
    lp = log_kernel(w, c1, c2)
    rows = torch.ones(n, dtype=torch.bool)
    s = choose_scale(lp, rows, target, 0.0)
    assert 0.0 <= s <= 1.0
    assert float(torch.exp(log_ess(s * lp, rows))) >= target * (1 - 1e-9)  # attainable with min_scale 0
    if s < 1.0:  # the largest such scale: a little more fails the target
        assert float(torch.exp(log_ess(min(1.0, s + 1e-6) * lp, rows))) < target * (1 + 1e-6)


def test_adaptive_logs_the_chosen_kernel_and_respects_min_scale():
    logp, old, adv, mask = _batch(scale=2.0)
    kw = dict(log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask)
    _, m = compute_policy_loss("vespo_adaptive", target_ess=0.6, **kw)
    s = m["vespo/scale"]
    assert 0 < s < 1 and m["vespo/ess_phi"] >= 0.6 - 1e-9 and m["vespo/ess_phi_default"] < 0.6
    assert m["vespo/c1_pos_eff"] == pytest.approx(2.0 * s) and m["vespo/c2_neg_eff"] == pytest.approx(2.0 * s)
    _, m = compute_policy_loss("vespo_adaptive", target_ess=0.6, min_scale=0.9, **kw)
    assert m["vespo/scale"] >= 0.9
    with pytest.raises(ValueError, match="target_ess"):
        compute_policy_loss("vespo_adaptive", target_ess=0.0, **kw)
