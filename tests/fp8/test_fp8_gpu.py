"""FP8 on a GPU with Transformer Engine (skipped on CPU machines; each recipe skips with the reason
``check_fp8_environment`` gives when this GPU / TE cannot run it).

Run: ``pytest -m gpu tests/fp8/test_fp8_gpu.py`` on a node with transformer-engine installed.

* every recipe: forward + backward of the ``small`` Qwen3-MoE model (hidden 128, 4 MoE layers,
  Transformer Engine spec, bf16 params) in FP8 vs the same weights in BF16: logits and
  gradients close (FP8 E4M3 keeps 3 mantissa bits: ~4% relative rounding per element);
* FP8 parameters (``fp8_param_gather``): the actor keeps GEMM weights as TE quantised tensors,
  trains through the distributed optimizer, and exports bf16 Hugging Face tensors whose
  values are the FP8-rounded weights (``checkpoint/hf_weights.py``), round-tripping HF weights.
"""

import pytest
import torch
from _dist import run_distributed

from megatron_vespo.config.base import ConfigError
from megatron_vespo.fp8 import RECIPES, FP8Config, check_fp8_environment

pytestmark = pytest.mark.gpu


def _cfg(recipe: str, **kw) -> FP8Config:
    # E4M3 everywhere for the block recipes (TE's defaults), hybrid (E5M2 gradients) for per-tensor ones
    fmt = "e4m3" if recipe in ("blockwise", "mxfp8") else "hybrid"
    return FP8Config(fp8=fmt, fp8_recipe=recipe, **kw)


def _require(cfg: FP8Config) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    try:
        check_fp8_environment(cfg)
    except ConfigError as exc:
        pytest.skip(str(exc))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def _fp8_vs_bf16(rank, world_size, cfg_dict):
    from megatron_vespo.fp8 import check_fp8_job, fp8_overrides, fp8_summary
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config
    from megatron_vespo.train.config import ParallelConfig
    from megatron_vespo.train.parallel import destroy_parallel, init_parallel

    cfg = FP8Config(**cfg_dict)
    par = ParallelConfig()
    init_parallel(par)
    model_cfg = ModelConfig(preset="small", params_dtype="bfloat16")
    hf = get_hf_config(model_cfg)
    check_fp8_job(cfg, model_cfg, par, hf)
    ref = build_gpt_model(hf, par, params_dtype="bfloat16", use_te=True)
    q = build_gpt_model(hf, par, params_dtype="bfloat16", use_te=True, **fp8_overrides(cfg))
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in q.named_parameters():
            p.copy_(ref_params[name])
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, hf.vocab_size, (4, 64), device="cuda", generator=g)
    pos = torch.arange(64, device="cuda").expand(4, 64)

    def step(model):
        model.zero_grad(set_to_none=True)
        logits = model(tokens, pos, None)  # [B, S, V]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters())
                           if p.grad is not None])
        return logits.detach().float(), grads

    for _ in range(3):  # delayed scaling needs a few steps of amax history; harmless for the others
        step(q)
    a, ga = step(ref)
    b, gb = step(q)
    lp_a = torch.log_softmax(a, -1).gather(-1, tokens[..., None])
    lp_b = torch.log_softmax(b, -1).gather(-1, tokens[..., None])
    out = {"rel": float((b - a).norm() / a.norm()), "cos": _cos(a, b), "grad_cos": _cos(ga, gb),
           "lp_absmax": float((lp_a - lp_b).abs().max()), "summary": fp8_summary(q.config, q)}
    destroy_parallel()
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_forward_backward_close_to_bf16(recipe):
    cfg = _cfg(recipe)
    _require(cfg)
    out = run_distributed(_fp8_vs_bf16, 1, cfg.model_dump(), init_gloo=False, timeout=600)[0]
    print(f"{recipe}: logits rel {out['rel']:.4f} cos {out['cos']:.5f}, grad cos {out['grad_cos']:.4f}, "
          f"|d log p| max {out['lp_absmax']:.4f}")
    assert out["summary"]["fp8/recipe"] == recipe and out["summary"]["fp8/fp8_param_tensors"] == 0.0
    assert out["rel"] < 0.15 and out["cos"] > 0.98
    assert out["grad_cos"] > 0.9


def _fp8_params_actor(rank, world_size, cfg_dict):
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict, load_hf_weights
    from megatron_vespo.fp8 import is_fp8_tensor
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import num_moe_layers
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig
    from megatron_vespo.train.parallel import destroy_parallel
    from megatron_vespo.train.synthetic import synthetic_batch

    actor = MegatronActor(ModelConfig(preset="small", params_dtype="bfloat16"),
                          ParallelConfig(use_distributed_optimizer=True),
                          TrainConfig(rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2, lr=1e-3),
                          LossConfig(name="vespo"), fp8=FP8Config(**cfg_dict))
    info = dict(actor.fp8_info)
    fp8_names = sorted(n for n, p in actor.model[0].module.named_parameters() if is_fp8_tensor(p))
    def export():  # clone: unsplit tensors may alias the live parameters
        return {k: v.detach().cpu().clone() for k, v in
                export_hf_state_dict(actor.model, actor.hf_cfg, dtype=torch.bfloat16).items()}

    # Hugging Face weights in -> FP8 parameters (quantised on copy) -> main weights -> export
    exported = export()
    g = torch.Generator().manual_seed(1)
    target = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) if v.dim() == 2 else v.cpu()
              for k, v in exported.items()}
    load_hf_weights(actor.model, target, actor.hf_cfg)
    actor.optimizer.reload_model_params()  # the FP32 main weights follow the loaded parameters
    back = export()
    rt = {k: float((back[k].float() - target[k].float()).norm() / target[k].float().norm().clamp_min(1e-12))
          for k in target}
    hf = actor.hf_cfg
    batch = synthetic_batch(8, 32, hf.vocab_size, seed=1, num_moe_layers=num_moe_layers(hf),
                            topk=hf.num_experts_per_tok, num_experts=hf.num_experts)
    lp0, _ = actor.compute_log_probs(batch)
    metrics = [m for _ in range(3) for m in actor.train_on_rollout(batch)]
    lp1, _ = actor.compute_log_probs(batch)
    after = export()
    moved = {k: float((after[k].float() - back[k].float()).abs().max()) for k in back}
    destroy_parallel()
    return {"info": info, "fp8_names": fp8_names, "dtypes": {str(v.dtype) for v in back.values()},
            "names": (sorted(exported), sorted(target)), "rt": rt, "moved": moved, "metrics": metrics,
            "lp0": lp0, "lp1": lp1, "adv": batch.advantages, "mask": batch.loss_mask}


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_param_model_trains_and_exports_bf16_hf_tensors(recipe):
    cfg = _cfg(recipe, fp8_param_gather=True, reuse_grad_buf_for_mxfp8_param_ag=recipe == "mxfp8")
    _require(cfg)
    out = run_distributed(_fp8_params_actor, 1, cfg.model_dump(), init_gloo=False, timeout=900)[0]
    assert out["info"]["fp8/param"] is True and out["info"]["fp8/fp8_param_tensors"] > 0
    assert any("linear_fc1" in n for n in out["fp8_names"]) and any("linear_qkv" in n for n in out["fp8_names"])
    assert out["dtypes"] == {"torch.bfloat16"}
    assert out["names"][0] == out["names"][1]
    worst = max(out["rt"].values())
    print(f"{recipe}: HF round trip through FP8 params, worst relative error {worst:.4f}")
    assert worst < 0.1  # FP8 rounding of the GEMM weights; norms and embeddings come back exactly
    assert all(out["rt"][k] == 0.0 for k in out["rt"] if "norm" in k or "embed_tokens" in k)
    assert all(m["update_ok"] == 1.0 for m in out["metrics"])
    # the distributed optimizer re-quantised the FP8 weights after each step: they moved
    assert max(v for k, v in out["moved"].items() if "experts" in k) > 0
    pos = (out["adv"] > 0).unsqueeze(1) & (out["mask"] > 0)
    assert (out["lp1"] - out["lp0"])[pos].mean() > 0


def _fp8_recompute_r3(rank, world_size, cfg_dict):
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import num_moe_layers
    from megatron_vespo.routing.config import RoutingReplayConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig
    from megatron_vespo.train.parallel import destroy_parallel
    from megatron_vespo.train.synthetic import synthetic_batch

    over = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    actor = MegatronActor(ModelConfig(preset="small", params_dtype="bfloat16", transformer_overrides=over),
                          ParallelConfig(),
                          TrainConfig(rollout_batch_size=4, mini_batch_size=4, micro_batch_size=2, lr=1e-4),
                          LossConfig(name="vespo"), RoutingReplayConfig(mode="R3"), fp8=FP8Config(**cfg_dict))
    hf = actor.hf_cfg
    batch = synthetic_batch(4, 32, hf.vocab_size, seed=1, num_moe_layers=num_moe_layers(hf),
                            topk=hf.num_experts_per_tok, num_experts=hf.num_experts)
    metrics = actor.train_on_rollout(batch)
    destroy_parallel()
    return metrics, num_moe_layers(hf)


@pytest.mark.parametrize("recipe", ["delayed"])
def test_fp8_recompute_replays_routes_through_te_checkpoint(recipe):
    """Under FP8 Megatron recomputes through TE's te_checkpoint, which does not set Megatron's
    checkpointing flag: the backward re-runs must still replay the queued routes."""
    cfg = _cfg(recipe)
    _require(cfg)
    metrics, n_moe = run_distributed(_fp8_recompute_r3, 1, cfg.model_dump(), init_gloo=False, timeout=900)[0]
    assert metrics[0]["update_ok"] == 1.0
    assert metrics[0]["routing/replayed_recomputes"] == 2 * n_moe  # every MoE layer, both micro-batches
