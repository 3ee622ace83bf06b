"""Aggregation modes and the micro-batch ``global_denominator`` contract."""

from __future__ import annotations

import pytest
import torch

from megatron_vespo.losses import (
    AGG_MODES,
    agg_loss,
    available_losses,
    compute_policy_loss,
    get_loss,
    local_denominator,
    loss_denominator,
    mini_batch_denominator,
)


def _rand(B=5, T=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 0, 3, 1, 5])[:B]
    mask = torch.arange(T) < lengths.unsqueeze(1)
    return loss, mask, lengths


def test_agg_modes_by_hand():
    loss, mask, n = _rand()
    masked = loss * mask
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(masked.sum().item() / n.sum().item())
    rows = masked.sum(-1)[n > 0]
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(rows.mean().item())
    means = (masked.sum(-1)[n > 0] / n[n > 0])
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(means.mean().item())
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(masked.sum().item() / 7)
    assert agg_loss(loss, mask, "token-mean", global_denominator=100).item() == pytest.approx(masked.sum().item() / 100)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_masked_inf_and_nan_neither_leak_nor_poison_gradients(mode):
    loss, mask, _ = _rand()
    loss = loss.clone().requires_grad_(True)
    poisoned = torch.where(mask, loss, torch.tensor(float("nan"), dtype=loss.dtype))
    out = agg_loss(poisoned, mask, mode)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(loss.grad).all() and (loss.grad[~mask] == 0).all()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_masked_rows_and_batches_are_harmless(mode):
    loss, mask, _ = _rand()
    assert agg_loss(loss, torch.zeros_like(mask), mode).item() == 0.0
    # Adding all-masked rows changes nothing.
    more = torch.cat([loss, torch.randn(3, 7, dtype=loss.dtype)])
    more_mask = torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)])
    assert agg_loss(more, more_mask, mode).item() == pytest.approx(agg_loss(loss, mask, mode).item(), abs=1e-14)


def test_bad_modes_and_denominators():
    loss, mask, _ = _rand()
    with pytest.raises(ValueError, match="mode='token_mean' is not an aggregation mode"):
        agg_loss(loss, mask, "token_mean")
    with pytest.raises(ValueError, match="global_denominator must be > 0"):
        agg_loss(loss, mask, "token-mean", global_denominator=0)
    with pytest.raises(ValueError, match=r"must both be \[B, T\]"):
        agg_loss(loss, mask[:, :3], "token-mean")
    with pytest.raises(ValueError, match="fixed length"):
        local_denominator(mask, "seq-mean-token-sum-norm")
    assert local_denominator(mask, "token-mean") == 16.0
    assert local_denominator(mask, "seq-mean-token-mean") == 4.0


def _modes(name):
    spec = get_loss(name)
    return list(AGG_MODES) if spec.reduction == "agg" else [None]


CASES = [(n, m) for n in available_losses() for m in _modes(n) if not get_loss(n).call_statistics]


@pytest.mark.parametrize("name,mode", CASES)
def test_micro_batches_with_global_denominator_sum_to_the_mini_batch(name, mode, batch_factory):
    """Split 12 rows (4 groups of 3) into 3 micro-batches with their own padding; sum == whole batch."""
    b = batch_factory(B=12, T=10, groups=4, seed=7, delta_scale=0.4, tis=True)
    whole, _ = compute_policy_loss(name, **b.kwargs(loss_agg_mode=mode))
    (whole_grad,) = torch.autograd.grad(whole, b.log_prob)

    splits = [slice(0, 3), slice(3, 9), slice(9, 12)]  # whole groups in each micro-batch
    if mode == "seq-mean-token-sum-norm":
        denom = float(b.mask.shape[1])  # a constant length, not a sum of counts
    else:
        denom = sum(loss_denominator(name, b.mask[s], loss_agg_mode=mode, group_index=b.group_index[s])
                    for s in splits)
    lp = b.log_prob.detach().clone().requires_grad_(True)
    total = 0.0
    for s in splits:
        t_max = int(b.mask[s].sum(-1).max().clamp(min=1))  # trim padding: micro-batches differ in T
        kw = dict(log_prob=lp[s, :t_max], old_log_prob=b.old_log_prob[s, :t_max], advantages=b.advantages[s],
                  response_mask=b.mask[s, :t_max], rollout_is_weights=b.rollout_is_weights[s, :t_max],
                  loss_agg_mode=mode, global_denominator=denom)
        if get_loss(name).needs_group:
            kw.update(group_index=b.group_index[s], group_size=3)
        loss, _ = compute_policy_loss(name, **kw)
        total = total + loss
    total.backward()
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, whole_grad, rtol=1e-12, atol=1e-14)


def test_call_statistics_losses_are_exact_only_for_the_whole_batch(batch_factory):
    """PSIS / adaptive VESPO fit a statistic over the call's rows: declared, and splitting changes the loss."""
    declared = {n for n in available_losses() if get_loss(n).call_statistics}
    assert declared == {"psis", "vespo_adaptive"}
    b = batch_factory(B=40, T=6, groups=5, seed=3, delta_scale=1.5, empty_row=False)
    for name in sorted(declared):
        whole, _ = compute_policy_loss(name, **b.kwargs(), global_denominator=float(b.mask.sum()))
        parts = sum(compute_policy_loss(name, log_prob=b.log_prob[s], old_log_prob=b.old_log_prob[s],
                                        advantages=b.advantages[s], response_mask=b.mask[s],
                                        group_index=b.group_index[s], global_denominator=float(b.mask.sum()))[0]
                    for s in (slice(0, 20), slice(20, 40)))
        assert not torch.allclose(parts, whole, rtol=1e-6), name


def test_global_denominator_accepts_tensors(batch_factory):
    b = batch_factory()
    a, _ = compute_policy_loss("vespo", **b.kwargs(global_denominator=17.0))
    c, _ = compute_policy_loss("vespo", **b.kwargs(global_denominator=torch.tensor(17.0)))
    assert a.item() == pytest.approx(c.item(), abs=1e-15)


def test_loss_denominator_per_reduction(batch_factory):
    b = batch_factory(B=8, groups=4)
    assert loss_denominator("vespo", b.mask) == float(b.mask.sum())
    assert loss_denominator("gspo", b.mask) == float(b.mask.any(-1).sum())  # seq-mean-token-mean default
    assert loss_denominator("gmpo", b.mask) == 8.0
    assert loss_denominator("gepo", b.mask, group_index=b.group_index) == 4.0
    with pytest.raises(ValueError, match="pass group_index"):
        loss_denominator("gepo", b.mask)
    with pytest.raises(ValueError, match="leave loss_agg_mode unset"):
        loss_denominator("gmpo", b.mask, loss_agg_mode="token-mean")


def test_seq_mean_token_mean_is_bit_exact_with_verl_formula():
    """verl ``agg_loss``: row sums / (row token count + 1e-8), mean over non-empty rows.

    With max(n_i, 1) (the earlier rule) the result differs from verl by a relative 1e-9..2e-8
    in float64, so ``torch.equal`` fails; with ``n_i + 1e-8`` it is the same arithmetic.
    """
    g = torch.Generator().manual_seed(3)
    loss = torch.randn(6, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 11, generator=g) > 0.4
    mask[2] = False  # an empty row contributes 0 and is not counted
    m = mask.to(torch.float64)
    seq_tok = m.sum(-1)
    seq_losses = (loss * m).sum(-1) / (seq_tok + 1e-8)
    seq_mask = (seq_tok > 0).to(torch.float64)
    verl = (seq_losses * seq_mask).sum() / seq_mask.sum()
    assert torch.equal(agg_loss(loss, mask, "seq-mean-token-mean"), verl)
    old_rule = ((loss * m).sum(-1) / seq_tok.clamp(min=1) * seq_mask).sum() / seq_mask.sum()
    assert not torch.equal(old_rule, verl)  # the test can tell the two rules apart


def test_mini_batch_denominator_is_the_summed_count_or_the_fixed_length():
    """One call for a mini-batch held whole: the count for counting modes and reductions, the
    longest response for seq-mean-token-sum-norm (not the padded T, not refused), floored at 1."""
    _, mask, lengths = _rand()
    assert mini_batch_denominator("grpo", mask, loss_agg_mode="seq-mean-token-sum-norm") == float(lengths.max())
    padded = torch.cat([mask, torch.zeros(5, 4, dtype=torch.bool)], dim=1)  # longer padding changes nothing
    assert mini_batch_denominator("grpo", padded, loss_agg_mode="seq-mean-token-sum-norm") == float(lengths.max())
    for mode in ("token-mean", "seq-mean-token-mean"):
        assert mini_batch_denominator("grpo", mask, loss_agg_mode=mode) == local_denominator(mask, mode)
    group = torch.tensor([0, 1, 1, 2, 2])
    assert mini_batch_denominator("gepo", mask, group_index=group) == loss_denominator("gepo", mask, group_index=group)
    empty = torch.zeros_like(mask)
    assert mini_batch_denominator("grpo", empty, loss_agg_mode="seq-mean-token-sum-norm") == 1.0
    assert mini_batch_denominator("grpo", empty, loss_agg_mode="token-mean") == 1.0
