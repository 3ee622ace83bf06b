"""GPU-only trainer tests: Transformer Engine spec, FP8, NCCL layouts (skipped on CPU machines).

Run on a node with >= 2 CUDA GPUs and transformer-engine installed:
``pytest -m gpu tests/train/test_gpu.py``. They mirror the CPU tests with the GPU code path:
TE layers (fused input norm in ``linear_qkv``, grouped-GEMM experts), NCCL instead of gloo,
no compat patches.
"""

import pytest
import torch
from _dist import run_distributed

pytestmark = pytest.mark.gpu


def _needs(n_gpus: int = 1, fp8: bool = False) -> None:
    if torch.cuda.device_count() < n_gpus:
        pytest.skip(f"needs {n_gpus} CUDA GPUs")
    pytest.importorskip("transformer_engine")
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9 (Ada/Hopper)")


def _te_vs_local_logits(rank, world_size):
    """Same weights through the TE spec and the local spec give the same logits (1 GPU)."""
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.init import init_layout_invariant_
    from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config
    from megatron_vespo.train.config import ParallelConfig
    from megatron_vespo.train.parallel import destroy_parallel, init_parallel

    par = ParallelConfig()
    init_parallel(par)
    hf = get_hf_config(ModelConfig(preset="tiny-dense-first"))
    local = build_gpt_model(hf, par, use_te=False)
    init_layout_invariant_(local, seed=3)
    te = build_gpt_model(hf, par, use_te=True)
    names = dict(te.named_parameters())
    assert any(n.endswith("self_attention.linear_qkv.layer_norm_weight") for n in names)
    assert any(n.endswith("mlp.experts.linear_fc1.weight0") for n in names)
    assert any(n.endswith("mlp.linear_fc1.layer_norm_weight") for n in names)  # dense layer 0
    rename = {}
    for n in dict(local.named_parameters()):
        t = n.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        if n.startswith("decoder.layers.0.pre_mlp_layernorm"):
            t = "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
        if ".local_experts." in n:
            head, tail = n.split(".local_experts.")
            idx, rest = tail.split(".", 1)
            t = f"{head}.{rest}{idx}"
        rename[n] = t
    with torch.no_grad():
        for n, p in local.named_parameters():
            names[rename[n]].copy_(p)
    tokens = torch.randint(0, hf.vocab_size, (2, 32), device="cuda")
    pos = torch.arange(32, device="cuda").expand(2, 32)
    with torch.no_grad():
        a, b = local.eval()(tokens, pos, None), te.eval()(tokens, pos, None)
    destroy_parallel()
    return (a - b).abs().max().item()


def test_te_spec_matches_local_spec():
    _needs(1)
    err = run_distributed(_te_vs_local_logits, 1, init_gloo=False, timeout=600)[0]
    assert err < 1e-3  # TE kernels (TF32 GEMMs) vs local fp32


def _actor_run(rank, world_size, layout, fp8, routing):
    from actor_cases import make_actor, make_batch

    from megatron_vespo.fp8.config import FP8Config
    from megatron_vespo.train.actor import MegatronActor

    if fp8:  # bf16 params, hidden 128 (FP8 GEMMs need dims divisible by 16), delayed-scaling recipe
        from megatron_vespo.losses.config import LossConfig
        from megatron_vespo.models.config import ModelConfig
        from megatron_vespo.routing.config import RoutingReplayConfig
        from megatron_vespo.train.config import ParallelConfig, TrainConfig

        actor = MegatronActor(ModelConfig(preset="small", params_dtype="bfloat16"), ParallelConfig(**layout),
                              TrainConfig(rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2, lr=1e-3),
                              LossConfig(name="vespo"), RoutingReplayConfig(mode=routing),
                              fp8=FP8Config(fp8="hybrid", fp8_recipe="delayed"), init="layout_invariant")
    else:
        actor = make_actor(layout, routing=routing)
    batch = make_batch(actor, seq_len=32)
    lp0, _ = actor.compute_log_probs(batch)
    metrics = [m for _ in range(3) for m in actor.train_on_rollout(batch)]
    lp1, _ = actor.compute_log_probs(batch)
    return lp0, lp1, metrics, batch.advantages, batch.loss_mask


def test_actor_trains_on_one_gpu_with_te_layers_and_r3():
    _needs(1)
    lp0, lp1, metrics, adv, mask = run_distributed(_actor_run, 1, {}, False, "R3", init_gloo=False, timeout=600)[0]
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in metrics)
    pos = (adv > 0).unsqueeze(1) & (mask > 0)
    assert (lp1 - lp0)[pos].mean() > 0


def test_fp8_training_runs_and_learns():
    _needs(1, fp8=True)
    lp0, lp1, metrics, adv, mask = run_distributed(_actor_run, 1, {}, True, "disabled", init_gloo=False,
                                                   timeout=600)[0]
    assert all(m["update_ok"] == 1.0 for m in metrics)
    pos = (adv > 0).unsqueeze(1) & (mask > 0)
    assert (lp1 - lp0)[pos].mean() > 0


@pytest.mark.parametrize("layout", [
    {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    {"expert_model_parallel_size": 2},
    {"tensor_model_parallel_size": 2, "sequence_parallel": True, "expert_model_parallel_size": 2,
     "expert_tensor_parallel_size": 1},
])
def test_nccl_layouts_match_one_gpu(layout):
    _needs(2)
    from actor_cases import layout_runs

    ref = run_distributed(layout_runs, 1, [({}, "R3", "tiny")], init_gloo=False, timeout=900)[0]["tiny/R3"]
    for out in run_distributed(layout_runs, 2, [(layout, "R3", "tiny")], init_gloo=False, timeout=900):
        run = out["tiny/R3"]
        m = ref["mask"] > 0
        assert (run["lp"][m] - ref["lp"][m]).abs().max() < 1e-3  # TF32 / NCCL reduction order
        for a, b in zip(ref["traj"], run["traj"]):
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)
