"""CpuDotProductAttention (models/cpu_attention.py) computes Megatron's attention through torch's SDPA.

Same math as megatron's DotProductAttention, another summation order: outputs and gradients must
agree to fp32 rounding, a whole update must land on the same weights to that precision, and the
module must step aside (run DotProductAttention.forward, same bits) wherever SDPA with a causal
mask would not be Megatron's computation.
"""

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tests (the fused path is CPU only)")

from actor_cases import LR, make_actor, make_batch  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megatron_vespo.models.cpu_attention import CpuDotProductAttention  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_process_group():
    yield
    from megatron_vespo.train.parallel import destroy_parallel

    destroy_parallel(destroy_process_group=True)


def _cores(actor):
    return [m for m in actor.model[0].modules() if isinstance(m, DotProductAttention)]


def _qkv(core, s=11, b=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hn = core.hidden_size_per_attention_head
    q = torch.randn(s, b, core.num_attention_heads_per_partition, hn, generator=gen)
    kv = [torch.randn(s, b, core.num_query_groups_per_partition, hn, generator=gen) for _ in range(2)]
    g = torch.randn(s, b, core.hidden_size_per_partition, generator=gen)
    return q, *kv, g


def _run(forward, core, q0, k0, v0, g, mask=None):
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    out = forward(core, q, k, v, mask)
    out.backward(g)
    return [out.detach(), q.grad, k.grad, v.grad]


def test_outputs_and_gradients_match_megatrons_attention():
    actor = make_actor({}, train={})
    cores = _cores(actor)
    assert cores and all(type(m) is CpuDotProductAttention for m in cores)
    core = cores[0]
    assert core.num_attention_heads_per_partition > core.num_query_groups_per_partition  # GQA is exercised
    q, k, v, g = _qkv(core)
    assert core._fused_path(q, k, None, None, None, None)
    ref = _run(DotProductAttention.forward, core, q, k, v, g)
    got = _run(CpuDotProductAttention.forward, core, q, k, v, g)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # causal: the first position attends to itself only, in both
    sq, b_, heads, hn = q.shape
    first = v[0].repeat_interleave(heads // k.size(2), dim=1).reshape(b_, heads * hn)
    torch.testing.assert_close(got[0][0], first, rtol=1e-6, atol=1e-6)


def test_grouped_query_heads_read_megatrons_groups_bit_for_bit():
    """enable_gqa (no repeated K/V) gives the bits of SDPA on K/V repeated as Megatron repeats them."""
    actor = make_actor({}, train={})
    core = _cores(actor)[0]
    q, k, v, g = _qkv(core, seed=3)
    rep = core.num_attention_heads_per_partition // core.num_query_groups_per_partition
    assert rep > 1

    def repeated(core, q, k, v, mask):  # the explicit repeat, then the same SDPA call
        k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
        return CpuDotProductAttention.forward(core, q, k, v, mask)

    ref = _run(repeated, core, q, k, v, g)
    got = _run(CpuDotProductAttention.forward, core, q, k, v, g)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_a_whole_update_lands_on_the_same_weights():
    torch.manual_seed(0)
    fused = make_actor({}, train={})
    batch = make_batch(fused)
    torch.manual_seed(0)
    plain = make_actor({}, train={})
    for m in _cores(plain):
        m.__class__ = DotProductAttention  # megatron's own forward
    mf, mp = fused.train_on_rollout(batch)[0], plain.train_on_rollout(batch)[0]
    assert mf["grad_norm"] == pytest.approx(mp["grad_norm"], rel=1e-5)
    assert mf["loss/micro_batch_sum"] == pytest.approx(mp["loss/micro_batch_sum"], rel=1e-5, abs=1e-7)
    # Adam's first steps move a weight by ~lr whatever its gradient's size, so a gradient near zero
    # turns rounding into a visible difference: bound it at a hundredth of one step
    for a, b in zip(fused.model[0].parameters(), plain.model[0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * LR)


def test_steps_aside_where_sdpa_would_not_be_megatrons_computation(monkeypatch):
    actor = make_actor({}, train={})
    core = _cores(actor)[0]
    q, k, v, g = _qkv(core, s=6, b=2, seed=3)
    fused = core._fused_path
    assert fused(q, k, None, None, None, None)
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    assert not fused(q, k, mask, None, None, None)  # an explicit mask (padding, arbitrary)
    assert not fused(q, k, None, AttnMaskType.padding, None, None)
    assert not fused(q, k, None, None, torch.zeros(1), None)  # attention bias
    assert not fused(q, k, None, None, None, object())  # packed sequences (THD)
    assert not fused(q[:1], k, None, None, None, None)  # query shorter than keys (decoding)
    assert not fused(q.bfloat16(), k.bfloat16(), None, None, None, None)  # Megatron's softmax-in-fp32 casts
    monkeypatch.setattr(core.attention_dropout, "p", 0.1)
    core.train()
    assert not fused(q, k, None, None, None, None)  # dropout in training
    core.eval()
    assert fused(q, k, None, None, None, None)  # dropout is off in eval
    monkeypatch.setattr(core.attention_dropout, "p", 0.0)
    monkeypatch.setattr(core.scale_mask_softmax, "window_size", (2, 0))
    assert not fused(q, k, None, None, None, None)  # sliding window
    # where it steps aside, the result is DotProductAttention's, bit for bit
    monkeypatch.setattr(core.scale_mask_softmax, "window_size", None)
    ref = _run(DotProductAttention.forward, core, q, k, v, g, mask=mask)
    got = _run(CpuDotProductAttention.forward, core, q, k, v, g, mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
