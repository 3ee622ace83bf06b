"""Old log-probs of update 1 taken from its own forward (train.fuse_old_log_prob) change nothing.

Update 1 runs on the weights the old log-probs are computed with, so a separate forward
before it only recomputes what the update's forward yields. The fused and the separate paths
must give the same losses, metrics and weights, for N = 1 and for N > 1 (where updates 2..N
still score against the pre-update-1 policy), with and without R3 replay.
"""

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tests (GPU variants in test_gpu.py)"),
              pytest.mark.usefixtures("parallel_teardown_module")]

from actor_cases import make_actor, make_batch  # noqa: E402

from megatron_vespo.train import forward as fwd  # noqa: E402


def _params(actor):
    return torch.cat([p.detach().flatten().clone() for p in actor.model[0].parameters()])


def _run(fuse, train, routing="disabled", monkeypatch=None):
    actor = make_actor({}, routing=routing, train={**train, "fuse_old_log_prob": fuse})
    batch = make_batch(actor)  # carries (random, valid) engine routes for R3
    rows_seen = []
    real = fwd.forward_log_probs

    def counting(model, mbs, **kw):
        rows_seen.extend(int(r) for mb in mbs for r in mb.rows)
        return real(model, mbs, **kw)
    monkeypatch.setattr("megatron_vespo.train.actor.forward_log_probs", counting)
    metrics = actor.train_on_rollout(batch)
    return metrics, _params(actor), sorted(rows_seen)


@pytest.mark.parametrize("train,routing", [
    ({"mini_batch_size": 8, "micro_batch_size": 4, "lr": 5e-3}, "disabled"),
    ({"mini_batch_size": 2, "micro_batch_size": 1, "lr": 5e-3}, "disabled"),
    ({"mini_batch_size": 4, "micro_batch_size": 2, "lr": 5e-3}, "R3")], ids=["N1", "N4", "N2-R3"])
def test_fused_old_log_probs_give_the_same_updates(train, routing, monkeypatch):
    m_sep, w_sep, rows_sep = _run(False, train, routing, monkeypatch)
    m_fus, w_fus, rows_fus = _run(True, train, routing, monkeypatch)
    mini = train["mini_batch_size"]
    assert rows_sep == list(range(8))
    assert rows_fus == list(range(mini, 8))  # mini-batch 1 skipped the separate forward (all of it at N = 1)
    assert len(m_sep) == len(m_fus) == 8 // mini
    keys = ["loss", "grad_norm", "kl_old", "ratio/mean", "is/seq_log_w_absmax", "mismatch/log_ppl_abs_diff"]
    for a, b in zip(m_sep, m_fus):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    assert m_fus[0]["ratio/mean"] == 1.0 and m_fus[0]["kl_old"] == 0.0  # W = 1 by definition
    assert torch.allclose(w_sep, w_fus, rtol=1e-5, atol=1e-7)


def test_fusion_is_off_where_every_old_log_prob_is_needed_first():
    assert make_actor({}, train={}).fuses_old_log_prob
    assert not make_actor({}, train={"fuse_old_log_prob": False}).fuses_old_log_prob
    assert not make_actor({}, train={"old_log_prob_source": "rollout"}).fuses_old_log_prob
    assert not make_actor({}, routing="R2", train={}).fuses_old_log_prob


def test_cpu_adam_takes_the_multi_tensor_path():
    """torch's AdamW picks its per-parameter Python loop for CPU tensors unless told foreach=True."""
    actor = make_actor({}, train={})
    opts = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    groups = [g for o in opts for g in o.optimizer.param_groups]
    assert groups and all(g["foreach"] is True for g in groups)


def test_cpu_adam_fused_is_a_choice_and_close_to_foreach():
    """train.cpu_adam=fused: torch's fused CPU AdamW kernel; the same update up to last-bit rounding."""
    torch.manual_seed(0)
    fe = make_actor({}, train={})
    batch = make_batch(fe)
    torch.manual_seed(0)
    fu = make_actor({}, train={"cpu_adam": "fused"})
    opts = getattr(fu.optimizer, "chained_optimizers", [fu.optimizer])
    groups = [g for o in opts for g in o.optimizer.param_groups]
    assert groups and all(g["fused"] is True and not g["foreach"] for g in groups)
    for _ in range(2):
        fe.train_on_rollout(batch)
        fu.train_on_rollout(batch)
    for a, b in zip(fe.model[0].parameters(), fu.model[0].parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(fe.model[0].parameters(), fu.model[0].parameters()))


def test_cpu_clip_grad_norm_and_scale_use_foreach_ops_bit_for_bit():
    """Megatron's CPU fallbacks loop over tensors in Python; the foreach versions must give the same bits."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads

    from megatron_vespo.compat.cpu import device_mode
    from megatron_vespo.train import optim

    make_actor({}, train={})  # build_optimizer installs them
    assert clip_grads.l2_norm_impl is optim.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is optim.foreach_scale
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(*shape, generator=g) * s for shape, s in (((37, 5), 1e-3), ((129,), 7.0), ((3, 4, 5), 1.0))]
    with device_mode():  # the fallbacks allocate on "cuda"
        ref, _ = mutils.local_multi_tensor_l2_norm(0, None, [grads], False)
    got, _ = optim.foreach_l2_norm(0, None, [grads], False)
    assert got.shape == ref.shape == (1,) and torch.equal(got, ref)
    a, b = [x.clone() for x in grads], [x.clone() for x in grads]
    mutils.local_multi_tensor_scale(0, None, [a, a], 0.37)
    optim.foreach_scale(0, None, [b, b], 0.37)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    src, dst_ref, dst = grads, [torch.empty_like(x) for x in grads], [torch.empty_like(x) for x in grads]
    mutils.local_multi_tensor_scale(0, None, [src, dst_ref], 1.0)
    optim.foreach_scale(0, None, [src, dst], 1.0)
    assert all(torch.equal(x, y) for x, y in zip(dst_ref, dst))
