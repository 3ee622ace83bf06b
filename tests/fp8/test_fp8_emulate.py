"""FP8 emulated on CPU: TE's scaling semantics per recipe, E5M2 gradients for ``hybrid``, the local-spec
linear-layer hook, the embedded-engine weight rounding, and the tiny actor training with emulated FP8."""

import sys
from pathlib import Path

import pytest
import torch

from megatron_vespo.config.base import ConfigError
from megatron_vespo.fp8 import FP8Config
from megatron_vespo.fp8.blockwise import dequantize_blockwise, quantize_blockwise
from megatron_vespo.fp8.emulate import EmulatedRecipe, _wrap, fake_quant, recipe_for
from megatron_vespo.rollout.embedded.fp8_weights import emulate_weights_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))


def _steps_ok(q: torch.Tensor, fmt_dtype: torch.dtype, scale: torch.Tensor) -> bool:
    """Every element of q / scale is exactly representable in the FP8 format (it came out of a cast)."""
    v = q.float() / scale
    return torch.allclose(v.to(fmt_dtype).float(), v, rtol=1e-5, atol=1e-7)


def test_tensorwise_current_scaling():
    x = torch.randn(40, 70) * 3
    q = fake_quant(x, "e4m3")
    s = x.abs().max() / 448.0  # TE Float8CurrentScaling: scale = fp8_max / amax of this tensor, FP32
    assert _steps_ok(q, torch.float8_e4m3fn, s)
    assert q.abs().max() == pytest.approx(float(x.abs().max()), rel=1e-6)  # amax maps to 448 exactly
    assert torch.all((q - x).abs() <= torch.maximum(x.abs() * 2**-4, s * 2**-10) * 1.0001)


def test_blockwise_scales_are_powers_of_two_unless_fp32_and_match_the_export_quantiser():
    w = torch.randn(256, 256) * torch.logspace(-2, 1, 256)
    p2 = fake_quant(w, "e4m3", (128, 128), power2=True)
    for i in (0, 128):
        for j in (0, 128):
            tile, qt = w[i:i + 128, j:j + 128], p2[i:i + 128, j:j + 128]
            s = torch.exp2(torch.ceil(torch.log2(tile.abs().max() / 448.0)))
            assert _steps_ok(qt, torch.float8_e4m3fn, s)
            assert float((tile / s).abs().max()) <= 448.0
    # FP32 scales (NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1): exactly the block-FP8 rollout export
    q, s = quantize_blockwise(w, (128, 128))
    assert torch.equal(fake_quant(w, "e4m3", (128, 128)), dequantize_blockwise(q, s))


def test_mxfp8_scales_each_32_element_group_along_k_with_e8m0():
    x = torch.randn(4, 96)
    x[0, 5] = 1e5  # an outlier in the first 32-group of row 0
    q = fake_quant(x, "e4m3", (1, 32), power2=True)
    assert torch.allclose(q[0, 32:], fake_quant(x[0:1, 32:], "e4m3", (1, 32), power2=True)[0])  # neighbours unaffected
    assert torch.equal(q[1:], fake_quant(x[1:], "e4m3", (1, 32), power2=True))
    s = torch.exp2(torch.ceil(torch.log2(x[0, :32].abs().max() / 448.0)))  # TE float_to_e8m0 rounds up
    assert _steps_ok(q[0, :32], torch.float8_e4m3fn, s)
    per_tensor = fake_quant(x, "e4m3")
    rel = lambda y: ((y - x).abs() / x.abs())[1:].mean()  # noqa: E731
    assert rel(q) < 0.05 < rel(per_tensor)  # per tensor, the outlier pushes small values into subnormals


def test_recipes_from_config():
    r = recipe_for(FP8Config(fp8="hybrid", fp8_recipe="tensorwise", emulate=True))
    assert (r.grad_format, r.power2) == ("e5m2", False)
    assert recipe_for(FP8Config(fp8="e4m3", fp8_recipe="blockwise", emulate=True)).power2
    assert recipe_for(FP8Config(fp8="e4m3", fp8_recipe="mxfp8", emulate=True)).grad_format == "e4m3"
    assert recipe_for(FP8Config(fp8="e4m3", fp8_recipe="mxfp8", fp8_wgrad=False, emulate=True)).grad_format is None
    with pytest.raises(ValueError, match="does not emulate fp8.fp8_recipe=delayed"):
        FP8Config(fp8="e4m3", emulate=True)
    with pytest.raises(ValueError, match="fp8_param_gather"):
        FP8Config(fp8="e4m3", fp8_recipe="tensorwise", emulate=True, fp8_param_gather=True)


def test_gemm_sees_quantised_operands_and_e5m2_gradients():
    recipe = EmulatedRecipe("tensorwise", "e5m2", False)
    fwd = _wrap(lambda x, w: torch.nn.functional.linear(x, w), recipe)
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    y = fwd(x, w)
    qx, qw = recipe.quant_input(x.detach()), recipe.quant_weight(w.detach())
    assert torch.allclose(y, qx @ qw.T)
    dy = torch.randn(6, 8)
    y.backward(dy)
    qdy = fake_quant(dy, "e5m2")
    assert not torch.equal(qdy, fake_quant(dy, "e4m3"))  # E5M2 really is coarser
    assert torch.allclose(x.grad, qdy @ qw) and torch.allclose(w.grad, qdy.T @ qx)


@pytest.fixture(scope="module")
def _one_process_group():
    pytest.importorskip("megatron.core")
    yield
    from megatron_vespo.train.parallel import destroy_parallel

    destroy_parallel(destroy_process_group=True)


def test_actor_hooks_local_spec_linears_and_trains_with_emulated_fp8(_one_process_group):
    from actor_cases import make_actor, make_batch

    from megatron_vespo.fp8.emulate import emulate_fp8

    bf16 = make_actor({}, train={"mini_batch_size": 4, "micro_batch_size": 4, "lr": 1e-3})
    batch = make_batch(bf16)
    lp_ref, _ = bf16.compute_log_probs(batch)
    cfg = FP8Config(fp8="hybrid", fp8_recipe="blockwise", emulate=True)
    from actor_cases import LR, MINI, B

    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.routing.config import RoutingReplayConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig

    actor = MegatronActor(ModelConfig(preset="tiny"), ParallelConfig(),
                          TrainConfig(rollout_batch_size=B, mini_batch_size=MINI, micro_batch_size=MINI, lr=LR),
                          LossConfig(name="vespo"), RoutingReplayConfig(mode="disabled"), init="layout_invariant",
                          fp8=cfg)
    wrapped = [n for n, m in actor.model[0].named_modules()
               if getattr(getattr(m, "_forward_impl", None), "__name__", "") == "forward_impl"]
    # 2 MoE layers x (qkv, proj, 8 experts x (fc1, fc2)); the output layer stays BF16
    assert len(wrapped) == 2 * (2 + 16) and not any("output_layer" in n for n in wrapped)
    lp0, _ = actor.compute_log_probs(batch)
    mask = batch.loss_mask > 0
    gap = (lp0 - lp_ref)[mask].abs()
    assert 0 < float(gap.mean()) < 0.05  # same weights, FP8 GEMMs: close but not equal
    pos = batch.advantages > 0
    for _ in range(15):
        metrics = actor.train_on_rollout(batch)
    lp1, _ = actor.compute_log_probs(batch)
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in metrics)
    up = (lp1 - lp0)[pos.unsqueeze(1) & mask].mean().item()
    down = (lp1 - lp0)[~pos.unsqueeze(1) & mask].mean().item()
    assert up > 0.1 and down < -0.1, (up, down)
    with pytest.raises(ConfigError, match="no local-spec linear"):
        emulate_fp8(_Empty(), cfg)


class _Empty(torch.nn.Module):
    class config:  # noqa: N801 - mimics a GPTModel's config attribute
        num_layers = 0


def test_engine_weight_rounding_matches_the_fp8_export():
    pytest.importorskip("transformers")
    from megatron_vespo.rollout.embedded.models import build_tiny_model
    from megatron_vespo.rollout.embedded.weight_update import hf_param_views

    model = build_tiny_model("tiny", seed=3)
    before = {k: v.clone() for k, v in hf_param_views(model).items()}
    n = emulate_weights_(model, "blockwise", (32, 32))
    after = hf_param_views(model)
    assert n == 2 * (4 + 8 * 3)
    q, s = quantize_blockwise(before["model.layers.1.mlp.experts.5.down_proj.weight"], (32, 32))
    assert torch.equal(after["model.layers.1.mlp.experts.5.down_proj.weight"], dequantize_blockwise(q, s))
    assert torch.equal(after["model.layers.0.mlp.gate.weight"], before["model.layers.0.mlp.gate.weight"])
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])


def test_embedded_engine_rounds_weights_after_every_load():
    pytest.importorskip("transformers")
    from megatron_vespo.rollout.embedded.engine import EmbeddedEngine
    from megatron_vespo.rollout.embedded.weight_update import hf_param_views

    engine = EmbeddedEngine.from_preset("tiny", seed=3, fp8_weights="mxfp8")
    name = "model.layers.0.self_attn.o_proj.weight"
    w = hf_param_views(engine.model)[name]
    assert torch.equal(w, fake_quant(w, "e4m3", (1, 32), power2=True))  # already on the MXFP8 grid
    new = torch.randn(64, 64)
    ok, msg = engine.load_weights([(name, new)])
    assert ok, msg
    got = hf_param_views(engine.model)[name]
    assert torch.equal(got, fake_quant(new, "e4m3", (1, 32), power2=True)) and not torch.equal(got, new)


@pytest.mark.parametrize("mode", ["R2", "R3", "disabled"])
def test_fp8_padding_past_the_batch_width_with_routing_replay(_one_process_group, mode):
    """FP8 pads micro-batches to multiples of 16: a batch 22 tokens wide is run 32 wide. The log-probs,
    the R2 records and the R2 replay must cope (they failed with shape errors / 'no recorded route')."""
    from actor_cases import LR, MINI, B, make_batch

    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.routing.config import RoutingReplayConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig

    actor = MegatronActor(ModelConfig(preset="tiny"), ParallelConfig(),
                          TrainConfig(rollout_batch_size=B, mini_batch_size=MINI, micro_batch_size=2, lr=LR),
                          LossConfig(name="vespo"), RoutingReplayConfig(mode=mode), init="layout_invariant",
                          fp8=FP8Config(fp8="e4m3", fp8_recipe="tensorwise", emulate=True))
    assert actor.seq_multiple == 16
    batch = make_batch(actor, seq_len=22)
    lp, _ = actor.compute_log_probs(batch)
    assert lp.shape == (B, 22)
    metrics = actor.train_on_rollout(batch)
    assert len(metrics) == B // MINI and all(m["update_ok"] for m in metrics)


def test_engine_activation_quantisation_per_token_group():
    pytest.importorskip("transformers")
    from megatron_vespo.fp8.emulate import _fp8_experts_forward, emulate_activations_
    from megatron_vespo.rollout.embedded.models import build_tiny_model

    model = build_tiny_model("tiny", seed=3)
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens).logits
        experts = model.model.layers[0].mlp.experts
        h = torch.randn(7, 64)
        idx = torch.tensor([[0, 3], [3, 5], [1, 0], [7, 6], [2, 4], [5, 1], [6, 7]])
        w = torch.rand(7, 2)
        # our expert loop with identity "quantisation" is transformers' loop
        assert torch.allclose(_fp8_experts_forward(experts, lambda x: x)(h, idx, w), experts(h, idx, w), atol=1e-6)
        assert emulate_activations_(model, group=32) == 2 * (4 + 1)
        got = model(tokens).logits
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.1
