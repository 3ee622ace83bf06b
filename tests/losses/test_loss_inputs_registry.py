"""Bad input and registry errors: each names the argument, parameter or loss to fix."""

from __future__ import annotations

import pytest
import torch

from megatron_vespo.config.base import ConfigError, load_config
from megatron_vespo.losses import (
    available_losses,
    compute_policy_loss,
    get_loss,
    register_loss,
    unregister_loss,
)
from megatron_vespo.losses.config import LossConfig


def _call(b, name="vespo", **kw):
    args = b.kwargs()
    args.update(kw)
    return compute_policy_loss(name, **args)


@pytest.mark.parametrize("arg,value,match", [
    ("old_log_prob", lambda b: b.old_log_prob[:, :-1], r"old_log_prob has shape \(8, 8\), expected \[8, 9\]"),
    ("response_mask", lambda b: b.mask[:-1], r"response_mask has shape"),
    ("advantages", lambda b: b.advantages[:-1], r"advantages has shape \(7,\), expected \[8\]"),
    ("advantages", lambda b: b.advantages.unsqueeze(0), r"advantages has shape \(1, 8\)"),
    ("rollout_is_weights", lambda b: torch.ones(8, 3, dtype=torch.float64), r"rollout_is_weights has shape"),
    ("log_prob", lambda b: b.log_prob[0], r"log_prob must be \[B, T\]"),
    ("old_log_prob", lambda b: b.old_log_prob.float(), r"old_log_prob has dtype torch.float32 but log_prob has"),
    ("advantages", lambda b: b.advantages.float(), r"advantages has dtype torch.float32"),
    ("log_prob", lambda b: b.log_prob.detach().long(), r"log_prob must be a floating tensor"),
    ("old_log_prob", lambda b: b.old_log_prob.tolist(), r"old_log_prob must be a torch.Tensor, got list"),
    ("response_mask", lambda b: b.mask.double() * 0.5, r"response_mask must hold only 0 and 1"),
    ("rollout_is_weights", lambda b: -torch.ones(8, 9, dtype=torch.float64), r"rollout_is_weights must be >= 0"),
    ("group_index", lambda b: b.group_index.double(), r"group_index must have an integer dtype"),
    ("group_index", lambda b: b.group_index[:3], r"group_index has shape \(3,\), expected \[8\]"),
])
def test_bad_tensors_name_the_argument(batch_factory, arg, value, match):
    b = batch_factory()
    with pytest.raises(ValueError, match=match):
        _call(b, "snis", **{arg: value(b)})


@pytest.mark.parametrize("arg", ["log_prob", "old_log_prob", "advantages", "rollout_is_weights"])
def test_nan_and_inf_inputs_are_rejected(batch_factory, arg):
    b = batch_factory(tis=True)
    bad = getattr(b, "mask" if arg == "response_mask" else arg).detach().clone()
    bad[..., 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{arg} contains \d+ non-finite values \(\d+ NaN\)"):
        _call(b, **{arg: bad})
    bad[..., 0] = float("inf")
    with pytest.raises(ValueError, match=rf"{arg} contains \d+ non-finite values \(0 NaN\)"):
        _call(b, **{arg: bad})


def test_device_mismatch_is_named(batch_factory):
    b = batch_factory()
    meta = torch.empty(b.mask.shape, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"old_log_prob is on meta but log_prob is on cpu"):
        _call(b, old_log_prob=meta)


@pytest.mark.parametrize("name", ["gepo", "snis"])
def test_group_losses_need_group_index(batch_factory, name):
    b = batch_factory()
    with pytest.raises(ValueError, match=rf"loss '{name}' normalises within prompt groups: pass group_index"):
        _call(b, name, group_index=None)


@pytest.mark.parametrize("name", ["gepo", "snis"])
def test_split_groups_are_caught_with_group_size(batch_factory, name):
    b = batch_factory(B=8, groups=2)  # 2 groups of 4
    _call(b, name, group_size=4)
    with pytest.raises(ValueError, match=r"group_size=3 .*split across micro-batches"):
        _call(b, name, group_size=3)


def test_group_index_may_be_a_list_and_ids_need_not_be_dense(batch_factory):
    b = batch_factory(B=8, groups=2)
    ref, _ = _call(b, "gepo")
    sparse, _ = _call(b, "gepo", group_index=[int(g) * 1000 + 7 for g in b.group_index])
    assert ref.item() == sparse.item()


@pytest.mark.parametrize("name", [n for n in available_losses() if get_loss(n).sequence_level])
def test_sequence_level_losses_reject_varying_advantages(batch_factory, name):
    b = batch_factory()
    adv = b.advantages.unsqueeze(-1) * b.mask + 0.0
    adv[0, 1] += 0.5  # row 0 no longer has one advantage
    with pytest.raises(ValueError, match=r"advantages vary along T within rows \[0\].*sequence-level"):
        _call(b, name, advantages=adv)
    # Padding may hold anything (GRPO writes zeros there).
    adv = b.advantages.unsqueeze(-1).expand_as(b.log_prob).clone()
    adv[~b.mask] = 123.0
    _call(b, name, advantages=adv)


def test_token_level_losses_use_per_token_advantages(batch_factory):
    b = batch_factory()
    adv = b.advantages.unsqueeze(-1) * torch.linspace(0.5, 1.5, 9, dtype=torch.float64)
    loss, _ = _call(b, "gpg", advantages=adv)
    expected = (-(adv * b.log_prob) * b.mask).sum() / b.mask.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-14)


def test_unknown_loss_lists_the_known_ones(batch_factory):
    with pytest.raises(ValueError, match=r"unknown loss 'vespoo'; available: cispo, gepo, gmpo, gpg, grpo"):
        _call(batch_factory(), "vespoo")
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss(None)


def test_unknown_and_mistyped_params_are_named(batch_factory):
    b = batch_factory()
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) k_pos for loss 'vespo'; accepted: c1_pos=2.0"):
        _call(b, k_pos=2.0)
    with pytest.raises(ValueError, match=r"parameter c1_pos of loss 'vespo' must be a number, got '2'"):
        _call(b, c1_pos="2")
    with pytest.raises(ValueError, match=r"parameter group_size of loss 'snis' must be an integer or null"):
        _call(b, "snis", group_size=2.5)
    with pytest.raises(ValueError, match=r"clip_ratio_c must be > 1"):
        _call(b, "grpo", clip_ratio_c=1.0)
    with pytest.raises(ValueError, match=r"tau_pos and tau_neg must be > 0"):
        _call(b, "sapo", tau_neg=0.0)
    with pytest.raises(ValueError, match=r"loss 'gmpo' reduces per sequence .* leave loss_agg_mode unset"):
        _call(b, "gmpo", loss_agg_mode="token-mean")
    with pytest.raises(ValueError, match=r"loss_agg_mode='mean' is not an aggregation mode"):
        _call(b, loss_agg_mode="mean")


def test_register_rejects_duplicates_and_bad_signatures(batch_factory):
    with pytest.raises(ValueError, match=r"loss 'vespo' is already registered \(by .*vespo_loss\)"):
        register_loss("vespo")(lambda x: None)
    with pytest.raises(ValueError, match="must be keyword-only with a default"):
        register_loss("tmp_bad")(lambda x, c: None)
    with pytest.raises(ValueError, match="non-empty string"):
        register_loss("")

    @register_loss("tmp_half_gpg", default_agg_mode="seq-mean-token-sum")
    def half(x, *, scale: float = 0.5):
        """Test loss."""
        return (scale * -(x.advantages * x.log_prob) * x.mask).sum() / x.mask.any(-1).sum(), {}
    try:
        b = batch_factory()
        assert "tmp_half_gpg" in available_losses()
        loss, metrics = _call(b, "tmp_half_gpg", scale=1.0)
        ref, _ = _call(b, "gpg", loss_agg_mode="seq-mean-token-sum")
        assert loss.item() == pytest.approx(ref.item()) and set(metrics) == {"loss"}
        assert get_loss("tmp_half_gpg").summary == "Test loss."
    finally:
        unregister_loss("tmp_half_gpg")
    assert "tmp_half_gpg" not in available_losses()


def test_loss_config_validates_params_and_mode():
    cfg = load_config(LossConfig, None, ["name=grpo", "params.clip_ratio_high=0.28"])
    assert cfg.params == {"clip_ratio_high": 0.28}
    for overrides, match in [
        (["name=nope"], r"name: Value error, unknown loss 'nope'"),
        (["params.c9=1"], r"unknown parameter\(s\) c9 for loss 'vespo'"),
        (["name=gepo", "loss_agg_mode=token-mean"], "leave loss_agg_mode unset"),
        (["params.c1_pos=abc"], "must be a number"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(LossConfig, None, overrides)
