"""Mathematical properties of VESPO (and GRPO at ratio 1), property-based where it helps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_vespo.losses import AGG_MODES, compute_policy_loss
from megatron_vespo.losses.inputs import build_input
from megatron_vespo.losses.vespo import gamma_kernel, sequence_log_weight

SETTINGS = settings(max_examples=30, deadline=None)
coef = st.floats(0.1, 6.0)


def _grad(name, b, **kw):
    b.log_prob.grad = None
    loss, metrics = compute_policy_loss(name, **b.kwargs(**kw))
    loss.backward()
    return loss.detach(), b.log_prob.grad.clone(), metrics


@SETTINGS
@given(c1=coef, c2=coef)
def test_phi_is_one_at_w_one_and_peaks_at_c1_over_c2(c1, c2):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert gamma_kernel(t(1.0), t(c1), t(c2)).item() == pytest.approx(1.0, abs=1e-12)
    peak = c1 / c2
    w = torch.linspace(max(peak * 0.05, 1e-6), peak * 4, 4001, dtype=torch.float64)
    phi = gamma_kernel(w, t(c1).expand_as(w), t(c2).expand_as(w))
    assert w[phi.argmax()].item() == pytest.approx(peak, rel=5e-3)
    at_peak = gamma_kernel(t(peak), t(c1), t(c2)).item()
    assert at_peak == pytest.approx(math.exp(c2 - c1) * peak ** c1, rel=1e-10)  # W^c1 e^{c2 (1 - W)} at c1/c2
    assert at_peak >= phi.max().item() - 1e-12


@SETTINGS
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(AGG_MODES), c1_pos=coef, c2_pos=coef, c1_neg=coef,
       c2_neg=coef)
def test_on_policy_vespo_equals_the_policy_gradient(batch_factory, seed, mode, c1_pos, c2_pos, c1_neg, c2_neg):
    b = batch_factory(seed=seed)
    b.old_log_prob = b.log_prob.detach().clone()
    v_loss, v_grad, m = _grad("vespo", b, loss_agg_mode=mode, c1_pos=c1_pos, c2_pos=c2_pos, c1_neg=c1_neg,
                              c2_neg=c2_neg)
    g_loss, g_grad, _ = _grad("gpg", b, loss_agg_mode=mode)
    torch.testing.assert_close(v_loss, g_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_grad, g_grad, rtol=1e-12, atol=1e-12)
    assert m["vespo/w_mean"] == pytest.approx(1.0) and m["vespo/phi_min"] == pytest.approx(1.0)
    assert m["vespo/ess"] == pytest.approx(1.0)


@SETTINGS
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 1.0))
def test_vespo_gradient_is_phi_times_advantage_over_token_count(batch_factory, seed, scale):
    b = batch_factory(seed=seed, delta_scale=scale)
    _, grad, _ = _grad("vespo", b)
    x = build_input(log_prob=b.log_prob, old_log_prob=b.old_log_prob, advantages=b.advantages,
                    response_mask=b.mask, sequence_level=True)
    log_w, _, _ = sequence_log_weight(x)
    pos = b.advantages >= 0
    c1 = torch.where(pos, 2.0, 3.0).to(torch.float64)
    c2 = torch.where(pos, 3.0, 2.0).to(torch.float64)
    phi = torch.exp(log_w) ** c1 * torch.exp(c2 * (1 - torch.exp(log_w)))
    expected = (-phi * b.advantages / b.mask.sum()).unsqueeze(-1) * b.mask
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


@SETTINGS
@given(seed=st.integers(0, 10_000), extra=st.integers(1, 12))
def test_zero_log_ratio_padding_tokens_leave_w_unchanged(batch_factory, seed, extra):
    """No length normalisation: appending on-policy tokens must not change W (it would with a mean)."""
    b = batch_factory(seed=seed, delta_scale=0.4, empty_row=False)
    lp = b.log_prob.detach()
    more = -torch.rand(lp.shape[0], extra, dtype=lp.dtype)
    # Put the extra (zero log-ratio) tokens after each row's last valid token by extending with valid mask.
    long_lp = torch.cat([lp, more], dim=1)
    long_old = torch.cat([b.old_log_prob, more], dim=1)
    long_mask = torch.cat([b.mask, torch.ones(lp.shape[0], extra, dtype=torch.bool)], dim=1)
    short = build_input(log_prob=lp, old_log_prob=b.old_log_prob, advantages=b.advantages, response_mask=b.mask,
                        sequence_level=True)
    long = build_input(log_prob=long_lp, old_log_prob=long_old, advantages=b.advantages, response_mask=long_mask,
                       sequence_level=True)
    torch.testing.assert_close(sequence_log_weight(long)[0], sequence_log_weight(short)[0], rtol=0, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(AGG_MODES))
def test_grpo_at_ratio_one_is_the_on_policy_policy_gradient(batch_factory, seed, mode):
    b = batch_factory(seed=seed)
    b.old_log_prob = b.log_prob.detach().clone()
    r_loss, r_grad, m = _grad("grpo", b, loss_agg_mode=mode)
    _, g_grad, _ = _grad("gpg", b, loss_agg_mode=mode)
    torch.testing.assert_close(r_grad, g_grad, rtol=1e-12, atol=1e-14)
    # Value: -A * 1 aggregated.
    adv_mat = b.advantages.unsqueeze(-1).expand_as(b.log_prob)
    from megatron_vespo.losses import agg_loss
    torch.testing.assert_close(r_loss, agg_loss(-adv_mat, b.mask, mode), rtol=1e-12, atol=1e-14)
    assert m["clipfrac"] == 0.0 and m["approx_kl"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0)


def test_coefficients_are_selected_by_advantage_sign(batch_factory):
    b = batch_factory(seed=4, delta_scale=0.3)
    base = dict(c1_pos=2.0, c2_pos=3.0, c1_neg=3.0, c2_neg=2.0)
    _, grad, m = _grad("vespo", b, **base)
    pos_rows = b.advantages > 0
    neg_rows = b.advantages < 0
    # Changing the negative-side coefficients changes only rows with A < 0, and vice versa.
    _, grad_neg, m_neg = _grad("vespo", b, **{**base, "c1_neg": 0.5, "c2_neg": 5.0})
    assert torch.equal(grad_neg[pos_rows], grad[pos_rows]) and not torch.allclose(grad_neg[neg_rows], grad[neg_rows])
    assert m_neg["vespo/phi_pos_mean"] == m["vespo/phi_pos_mean"]
    assert m_neg["vespo/phi_neg_mean"] != m["vespo/phi_neg_mean"]
    _, grad_pos, _ = _grad("vespo", b, **{**base, "c1_pos": 0.5, "c2_pos": 5.0})
    assert torch.equal(grad_pos[neg_rows], grad[neg_rows]) and not torch.allclose(grad_pos[pos_rows], grad[pos_rows])
    assert m["vespo/n_pos"] == float(pos_rows[b.mask.any(-1)].sum())
    assert m["vespo/n_neg"] == float(neg_rows[b.mask.any(-1)].sum())


def test_large_w_is_suppressed_and_c2_floor_applies(batch_factory):
    b = batch_factory(seed=1)
    b.old_log_prob = b.log_prob.detach() - 3.0  # W = e^{3 n} per row: far right of the kernel
    _, grad, m = _grad("vespo", b)
    assert m["vespo/phi_max"] < 1e-30 and grad.abs().max() < 1e-30
    # c2 <= 0 is floored at 1e-4: phi = W^c1 e^{1e-4 (1 - W)} with c1 = 0 is just below 1.
    b.old_log_prob = b.log_prob.detach() - 0.5
    _, grad0, m0 = _grad("vespo", b, c2_pos=0.0, c2_neg=-1.0, c1_pos=0.0, c1_neg=0.0)
    assert 0.99 < m0["vespo/phi_min"] < m0["vespo/phi_max"] < 1.0 and torch.isfinite(grad0).all()
