"""VESPO's length-normalisation ablation (paper: log W / T and log W / sqrt(T)) is opt-in and exact."""

import math

import pytest
import torch

from megatron_vespo.losses import compute_policy_loss


def _batch():
    g = torch.Generator().manual_seed(0)
    logp = -(torch.rand(4, 6, generator=g, dtype=torch.float64) + 0.1)
    old = logp.detach() + 0.4 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 5, 1])[:, None]
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2], dtype=torch.float64)
    return logp.requires_grad_(True), old, mask, adv


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_length_norm_power_divides_log_w_by_t_to_the_power(power):
    logp, old, mask, adv = _batch()
    loss, m = compute_policy_loss("vespo", log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask,
                                  length_norm_power=power)
    n = mask.sum(1).double()
    log_w = ((logp.detach() - old) * mask).sum(1) / n.pow(power)
    w = log_w.exp()
    c1 = torch.where(adv >= 0, 2.0, 3.0).double()
    c2 = torch.where(adv >= 0, 3.0, 2.0).double()
    phi = torch.exp(c2 + c1 * w.log() - c2 * w)
    expected = (-(phi * adv)[:, None] * logp * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    assert math.isfinite(m["loss"])


def test_length_norm_power_default_is_none_and_range_checked():
    logp, old, mask, adv = _batch()
    a, _ = compute_policy_loss("vespo", log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask)
    b, _ = compute_policy_loss("vespo", log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask,
                               length_norm_power=0.0)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="length_norm_power"):
        compute_policy_loss("vespo", log_prob=logp, old_log_prob=old, advantages=adv, response_mask=mask,
                            length_norm_power=2.0)
