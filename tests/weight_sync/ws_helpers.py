"""Shared pieces of the weight-sync tests: a tiny Megatron actor model and an embedded engine."""

from __future__ import annotations

import asyncio
from typing import Any

import torch


def build_model(tp: int = 1, ep: int = 1, seed: int = 0) -> tuple[Any, Any]:
    """This rank's tiny Qwen3-MoE ``GPTModel`` (parallel_state initialised for tp/ep) and its HF config."""
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config
    from megatron_vespo.train.config import ParallelConfig
    from megatron_vespo.train.parallel import init_parallel

    parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                              expert_tensor_parallel_size=1, sequence_parallel=tp > 1)
    init_parallel(parallel, seed=seed)
    hf_cfg = get_hf_config(ModelConfig(preset="tiny"))
    model = build_gpt_model(hf_cfg, parallel, params_dtype="float32")
    with torch.no_grad():  # HF-style init leaves routers/norms degenerate; make every tensor distinctive
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, hf_cfg


def engine_state(engine: Any) -> dict[str, torch.Tensor]:
    """The embedded engine's weights under checkpoint (HF) names."""
    from megatron_vespo.rollout.embedded.weight_update import hf_param_views

    return {k: v.clone() for k, v in hf_param_views(engine.model).items()}


def mismatches(engine: Any, ref: dict[str, torch.Tensor]) -> list[str]:
    """Names whose engine tensor is not bit-identical to ``ref``'s (plus missing ones)."""
    state = engine_state(engine)
    return [k for k, t in ref.items() if k not in state or not torch.equal(state[k], t)]


def fill_nan(engine: Any) -> None:
    """Poison every served weight, so a later check proves each one was written."""
    with torch.no_grad():
        for p in engine.model.parameters():
            p.fill_(float("nan"))


def nan_params(engine: Any) -> list[str]:
    """Served parameters that still hold NaN."""
    return [n for n, p in engine.model.named_parameters() if torch.isnan(p).any()]


def greedy(client: Any, run: Any, prompt: list[int], n: int = 8) -> tuple[list[int], list[float], int]:
    """Greedy tokens, their log-probs and the policy version the engine reported."""
    sample = run(client.generate(prompt, {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}))
    return list(sample.response_tokens), [float(x) for x in sample.rollout_log_probs], sample.policy_version


def new_loop() -> tuple[asyncio.AbstractEventLoop, Any]:
    """A fresh event loop and its ``run_until_complete``."""
    loop = asyncio.new_event_loop()
    return loop, loop.run_until_complete
