"""CPU compatibility layer for megatron-core 0.16.1 and the multi-process test helper."""

import pytest
import torch
from _dist import DistributedTestError, run_distributed

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compat is a no-op with CUDA")


def test_apply_is_idempotent_and_patches_cuda_entry_points():
    from megatron_vespo.compat.cpu import apply_cpu_compat, cpu_compat_active

    assert apply_cpu_compat() is True
    assert apply_cpu_compat() is True and cpu_compat_active()
    assert torch.cuda.current_device() == torch.device("cpu")

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.moe import moe_utils

    mask = fused_softmax.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    assert torch.equal(mask, torch.triu(torch.ones(4, 4), diagonal=1).bool())
    assert tutils.get_default_causal_mask is fused_softmax.get_default_causal_mask
    assert moe_utils.te_general_gemm is None
    # split sizes become numpy so all_to_all_single gets lists of ints
    assert moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True).tolist() == [1, 2]


def test_cuda_device_arguments_map_to_cpu_only_for_megatron_callers():
    from megatron_vespo.compat.cpu import apply_cpu_compat

    apply_cpu_compat()
    from megatron.core.optimizer import clip_grads

    # clip_grads.py:103/115 build tensors with device='cuda'; with the patch the norm is computed.
    g = [torch.full((3,), 2.0), torch.full((1,), 2.0)]
    store = torch.distributed.HashStore()
    group_created = not torch.distributed.is_initialized()
    if group_created:
        torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        norm = clip_grads.get_grad_norm_fp32(g, grad_stats_parallel_group=None)
    finally:
        if group_created:
            torch.distributed.destroy_process_group()
    assert norm == pytest.approx(4.0)
    # clip_grads.py:167 asserts a CUDA type string for megatron callers
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 3.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    assert torch.allclose(p.grad, torch.full((3,), 0.5), atol=1e-5)
    # our own code is not rewritten: a CUDA tensor request still fails loudly here
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_rng_tracker_forks_on_cpu_generator():
    from megatron_vespo.compat.cpu import apply_cpu_compat

    apply_cpu_compat()
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("a", 7)
    before = torch.get_rng_state()
    with tracker.fork("a"):
        x = torch.rand(3)
    with tracker.fork("a"):
        y = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    torch.manual_seed(7)
    assert torch.equal(x, torch.rand(3)) and not torch.equal(x, y)  # forked stream advances


def _rank_sum(rank, world_size, scale):
    t = torch.full((2,), float(rank + 1))
    torch.distributed.all_reduce(t)
    return {"rank": rank, "sum": t * scale}


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_run_distributed_returns_per_rank_results_and_propagates_tracebacks():
    out = run_distributed(_rank_sum, 2, 2.0, timeout=60)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(torch.equal(o["sum"], torch.full((2,), 6.0)) for o in out)
    with pytest.raises(DistributedTestError, match="boom on rank one") as err:
        run_distributed(_fail_on_rank_one, 2, timeout=60)
    assert "rank(s) [1]" in str(err.value) and "ValueError" in str(err.value)
