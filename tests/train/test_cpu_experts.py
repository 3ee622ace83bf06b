"""CpuSequentialMLP (models/cpu_experts.py) computes the same bits as megatron's SequentialMLP.

It skips Megatron's per-expert linear wrappers on CPU, so it must give identical outputs,
input / probability gradients and accumulated main_grads, identical whole updates, and step
aside (run SequentialMLP.forward) wherever its plain computation would not be Megatron's.
"""

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tests (the fast path is CPU only)")

from actor_cases import make_actor, make_batch  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402

from megatron_vespo.models.cpu_experts import CpuSequentialMLP  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    yield
    from megatron_vespo.train.parallel import destroy_parallel

    destroy_parallel(destroy_process_group=True)


def _experts(actor):
    return [m for m in actor.model[0].modules() if isinstance(m, SequentialMLP)]


def _run(actor, module, forward, x0, counts, p0, g):
    actor.model[0].zero_grad_buffer()
    x, p = x0.clone().requires_grad_(), p0.clone().requires_grad_()
    out, bias = forward(module, x, counts, p)
    out.backward(g)
    return [out.detach(), x.grad, p.grad] + [q.main_grad.clone() for q in module.parameters()], bias


def test_outputs_and_gradients_are_megatrons_bits():
    actor = make_actor({}, train={})
    experts = _experts(actor)
    assert experts and all(type(m) is CpuSequentialMLP for m in experts)
    m = experts[0]
    hidden = m.local_experts[0].linear_fc1.weight.shape[1]
    n = m.num_local_experts
    gen = torch.Generator().manual_seed(5)
    counts = torch.randint(0, 40, (n,), generator=gen)
    counts[min(1, n - 1)] = 0  # an expert that got no token
    t = int(counts.sum())
    x0, p0 = torch.randn(t, hidden, generator=gen), torch.rand(t, generator=gen)
    g = torch.randn(t, hidden, generator=gen)
    assert m._fast_path(x0)
    ref, ref_bias = _run(actor, m, SequentialMLP.forward, x0, counts, p0, g)
    got, bias = _run(actor, m, CpuSequentialMLP.forward, x0, counts, p0, g)
    assert bias is None and ref_bias is None
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert any(bool(x.abs().sum()) for x in got[3:])  # the gradients reached the expert weights


def test_a_whole_update_is_identical():
    torch.manual_seed(0)
    fast = make_actor({}, train={})
    batch = make_batch(fast)
    torch.manual_seed(0)
    slow = make_actor({}, train={})
    for m in _experts(slow):
        m.__class__ = SequentialMLP  # megatron's own forward
    mf, ms = fast.train_on_rollout(batch)[0], slow.train_on_rollout(batch)[0]
    assert mf["grad_norm"] == ms["grad_norm"] and mf["loss/micro_batch_sum"] == ms["loss/micro_batch_sum"]
    for a, b in zip(fast.model[0].parameters(), slow.model[0].parameters()):
        assert torch.equal(a, b)


def test_falls_back_where_megatron_would_compute_differently():
    actor = make_actor({}, train={})
    m = _experts(actor)[0]
    x = torch.zeros(3, m.local_experts[0].linear_fc1.weight.shape[1])
    assert m._fast_path(x)
    fc1 = m.local_experts[0].linear_fc1
    handle = fc1.register_forward_hook(lambda *a: None)  # e.g. an adapter or a probe
    assert not m._fast_path(x)
    handle.remove()
    fc1._forward_impl = fc1._forward_impl  # what fp8.emulate does (an instance-level GEMM replacement)
    assert not m._fast_path(x)
    del fc1._forward_impl
    assert m._fast_path(x)
    m.config.activation_func_clamp_value = 7.0
    try:
        assert not m._fast_path(x)
    finally:
        m.config.activation_func_clamp_value = None
