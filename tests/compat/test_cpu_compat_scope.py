"""The CUDA->CPU device mode (compat patch 8) is scoped to the calls that need it, not the whole process."""

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compat is a no-op with CUDA")


def _modes() -> int:
    return torch._C._len_torch_function_stack()


def test_no_torch_function_mode_outside_the_optimizer_and_checkpoint_calls():
    from megatron_vespo.compat.cpu import apply_cpu_compat, device_mode_active

    before = _modes()
    apply_cpu_compat()
    # a global mode would stay on the stack and tax every torch call of forward and backward
    assert _modes() == before == 0 and not device_mode_active()

    from megatron.core.dist_checkpointing import serialization
    from megatron.core.optimizer import clip_grads, optimizer

    for fn in (clip_grads.get_grad_norm_fp32, clip_grads.clip_grad_by_total_norm_fp32,
               optimizer.get_grad_norm_fp32,  # imported by name into optimizer.py: rebound too
               optimizer.FP32Optimizer.__init__, optimizer.MegatronOptimizer.load_state_dict,
               serialization.save, serialization.load):
        assert getattr(fn, "_megatron_vespo_device_mode", False), fn
    # the per-step path stays outside the mode, so the torch optimizer's per-parameter ops pay nothing
    assert not getattr(optimizer.MegatronOptimizer.step_with_ready_grads, "_megatron_vespo_device_mode", False)


def test_scoped_calls_see_cpu_for_cuda_and_hot_paths_get_cpu_factories():
    from megatron_vespo.compat.cpu import _in_device_mode, apply_cpu_compat, device_mode_active

    apply_cpu_compat()
    from megatron.core.optimizer import clip_grads
    from megatron.core.pipeline_parallel import schedules

    seen = {}

    def probe():
        seen["active"] = device_mode_active()
        seen["modes"] = _modes()
        return probe
    _in_device_mode(probe)()
    assert seen == {"active": True, "modes": 1} and _modes() == 0
    # the optimizer's grad-norm code asserts CUDA tensor types and allocates on "cuda": works on CPU
    from megatron_vespo.utils.net import free_port

    own = not torch.distributed.is_initialized()
    if own:  # the grad norm all-reduces over the default group
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                             world_size=1)
    try:
        grads = [torch.ones(3), torch.full((2,), 2.0)]
        norm = clip_grads.get_grad_norm_fp32(grads, norm_type=2.0)
        assert float(norm) == pytest.approx((3 + 8) ** 0.5)
        params = [torch.nn.Parameter(torch.zeros(3))]
        params[0].grad = torch.ones(3)
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=float(3 ** 0.5))
        assert torch.allclose(params[0].grad, torch.full((3,), 3 ** -0.5), atol=1e-5)
    finally:
        if own:
            torch.distributed.destroy_process_group()
    # schedules.py:596 allocates its token counter with device="cuda" on every step
    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu" and schedules.torch.Tensor is torch.Tensor
