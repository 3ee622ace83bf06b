"""Tiny configs: what the plan says equals what the built CPU model measures.

* parameter, gradient and optimizer-state bytes of the plan (meta shards + formulas) against a
  real model built with the project's builder and Megatron DDP + optimizer after one step;
* the activation formula (local spec, what runs on CPU) against the bytes autograd saves for
  backward in a real forward + log-prob pass, with and without recompute;
* the weight-sync buckets planned on meta against the real export's buckets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_vespo.config.base import load_config
from megatron_vespo.config.job import JobConfig
from megatron_vespo.plan.activations import ActivationInputs, measure_saved_bytes, micro_batch_activation_bytes
from megatron_vespo.plan.report import run_plan

TINY = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu_vespo.yaml"


@pytest.fixture
def gloo():
    """A 1-process gloo group + parallel_state, torn down after the test."""
    from megatron_vespo.parallel.config import ParallelConfig
    from megatron_vespo.parallel.state import parallel_session

    with parallel_session(ParallelConfig()):
        yield


def _measured_optimizer_bytes(optimizer) -> tuple[int, int]:
    """(Adam moment bytes, fp32 main-weight copies of 16-bit params) over Megatron's chained optimizers."""
    moments = main = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            moments += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim())
        main += sum(p.numel() * p.element_size() for g in getattr(opt, "fp32_from_float16_groups", []) for p in g)
    return moments, main


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planned_parameter_gradient_and_optimizer_bytes_equal_the_built_model(dtype, gloo):
    from megatron_vespo.models.qwen3_moe import build_model_from_config
    from megatron_vespo.train.optim import build_optimizer

    job = load_config(JobConfig, TINY, [f"model.params_dtype={dtype}"])
    plan = run_plan(job, source=TINY.name)  # the build runs in a spawned process: this one has a gloo group
    (rank,) = plan["parameters"]["per_rank"]

    model = build_model_from_config(job.model, job.parallel)
    bundle = build_optimizer([model], job.train, job.parallel, dp_size=1)
    tokens = torch.randint(0, 256, (2, 16))
    bundle.model[0](tokens, torch.arange(16).expand(2, 16), None).float().square().mean().backward()
    ok, _, _ = bundle.optimizer.step()
    assert ok

    params = list(model.parameters())
    assert rank["params"] == sum(p.numel() for p in params) == plan["parameters"]["total"]
    assert rank["bytes"] == sum(p.numel() * p.element_size() for p in params)
    ddp = bundle.model[0]
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in [*ddp.buffers, *ddp.expert_parallel_buffers])
    assert rank["grad_bytes"] == grads
    moments, main = _measured_optimizer_bytes(bundle.optimizer)
    assert rank["optimizer_bytes"] == moments + main
    assert (main > 0) == (dtype == "bfloat16")


RECOMPUTE = [
    ({}, None),
    ({"recompute_granularity": "selective"}, "selective"),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}, "full"),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2}, "full"),
    ({"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1}, "full"),
]


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense-first"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("overrides,granularity", RECOMPUTE, ids=["none", "selective", "full-u1", "full-u2", "block1"])
def test_activation_formula_matches_the_bytes_saved_on_cpu(preset, dtype, overrides, granularity, gloo):
    import transformers

    from megatron_vespo.models.presets import preset_kwargs
    from megatron_vespo.models.qwen3_moe import build_gpt_model
    from megatron_vespo.train.config import ParallelConfig
    from megatron_vespo.train.logprobs import token_log_probs

    hf = transformers.Qwen3MoeConfig(**preset_kwargs(preset))
    model = build_gpt_model(hf, ParallelConfig(), params_dtype=dtype, **overrides)
    # the formula models megatron's local spec as it runs on a GPU: its unfused DotProductAttention
    # (on CPU in fp32 we run torch's SDPA kernel instead, models/cpu_attention.py, which keeps less)
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for m in model.modules():
        if isinstance(m, DotProductAttention):
            m.__class__ = DotProductAttention
    b, s = 2, 48
    tokens = torch.randint(0, hf.vocab_size, (b, s))

    def step():
        logits = model(tokens, torch.arange(s).expand(b, s), None)
        return token_log_probs(logits, tokens, with_entropy=True)

    _, measured = measure_saved_bytes(step, model.parameters())
    est = micro_batch_activation_bytes(
        ActivationInputs.from_hf(hf), micro=b, seq=s, tp=1, nbytes=4 if dtype == "float32" else 2, spec="local",
        recompute=granularity, recompute_method=overrides.get("recompute_method"),
        recompute_num_layers=overrides.get("recompute_num_layers"))
    saved_after_forward = est["total"] - est["recompute_peak"]
    assert saved_after_forward == pytest.approx(measured, rel=0.05)
    if granularity == "full":  # the recomputed group is on top of what the forward kept
        assert est["recompute_peak"] > 0


def test_planned_weight_sync_buckets_equal_the_real_export(gloo):
    from megatron_vespo.checkpoint.hf_weights import iter_hf_weights
    from megatron_vespo.models.qwen3_moe import build_model_from_config, get_hf_config

    job = load_config(JobConfig, TINY, ["weight_sync.bucket_mb=0.05", "weight_sync.kind=distributed"])
    plan = run_plan(job, source=TINY.name)
    model = build_model_from_config(job.model, job.parallel)
    real = [(len(bk), sum(t.numel() * t.element_size() for _, t in bk))
            for bk in iter_hf_weights(model, get_hf_config(job.model), bucket_bytes=job.weight_sync.bucket_bytes)]
    ws = plan["weight_sync"]
    assert ws["buckets"] == len(real) > 1
    assert ws["bytes"] == sum(n for _, n in real)
    assert ws["largest_bucket_bytes"] == max(n for _, n in real)
    assert ws["http_calls"] == len(real) * job.rollout.num_engines
