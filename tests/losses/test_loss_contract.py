"""The one contract every registered loss satisfies (parametrised over the registry)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vespo.losses import available_losses, compute_policy_loss, get_loss

LOSSES = available_losses()


def test_registry_holds_the_promised_losses():
    assert set(LOSSES) >= {"vespo", "grpo", "gspo", "sapo", "cispo", "gmpo", "gpg", "gepo", "snis"}


def _run(name, b, **extra):
    loss, metrics = compute_policy_loss(name, **b.kwargs(**extra))
    return loss, metrics


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scalar_loss_finite_grads_and_float_metrics(name, dtype, batch_factory):
    b = batch_factory(dtype=dtype)
    loss, metrics = _run(name, b)
    assert loss.shape == () and loss.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    grad = b.log_prob.grad
    assert grad is not None and grad.shape == b.log_prob.shape and torch.isfinite(grad).all()
    assert (grad[~b.mask] == 0).all(), "masked tokens must get exactly zero gradient"
    assert grad[b.mask].abs().sum() > 0, "valid tokens must get gradient"
    assert {"loss", "approx_kl", "approx_kl_k3"} <= set(metrics)
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_extreme_log_ratios_stay_finite(name, scale, batch_factory):
    b = batch_factory(dtype=torch.float32, seed=3)
    gen = torch.Generator().manual_seed(1)
    delta = scale * (2 * torch.rand(b.mask.shape, generator=gen) - 1)
    delta[0, :3] = torch.tensor([scale, -scale, scale])
    b.old_log_prob = (b.log_prob.detach() - delta).to(torch.float32)
    for tis in (None, torch.full(b.mask.shape, 2.0) * b.mask):
        b.log_prob.grad = None
        b.rollout_is_weights = tis
        loss, metrics = _run(name, b)
        loss.backward()
        assert torch.isfinite(loss), (name, scale)
        assert torch.isfinite(b.log_prob.grad).all() and (b.log_prob.grad[~b.mask] == 0).all()
        assert all(math.isfinite(v) for v in metrics.values()), {k: v for k, v in metrics.items()
                                                                  if not math.isfinite(v)}


@pytest.mark.parametrize("name", LOSSES)
def test_all_masked_batch_is_harmless(name, batch_factory):
    b = batch_factory()
    b.mask = torch.zeros_like(b.mask)
    loss, metrics = _run(name, b)
    loss.backward()
    assert torch.isfinite(loss) and (b.log_prob.grad == 0).all()
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", LOSSES)
def test_mask_dtype_and_advantage_layout_do_not_matter(name, batch_factory):
    b = batch_factory()
    ref, _ = _run(name, b)
    float_mask, _ = _run(name, b, response_mask=b.mask.to(torch.float64))
    # GRPO-style [B, T] advantages: A on valid tokens, 0 on padding.
    adv_bt = b.advantages.unsqueeze(-1) * b.mask
    per_token, _ = _run(name, b, advantages=adv_bt)
    assert float_mask.item() == pytest.approx(ref.item(), abs=1e-12)
    assert per_token.item() == pytest.approx(ref.item(), abs=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_default_params_are_accepted_explicitly(name, batch_factory):
    b = batch_factory()
    spec = get_loss(name)
    ref, _ = _run(name, b)
    explicit, _ = _run(name, b, **dict(spec.params))
    assert explicit.item() == ref.item()
