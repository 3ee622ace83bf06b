"""Named Qwen3-MoE architectures, as Hugging Face ``Qwen3MoeConfig`` keyword arguments.

``qwen3-30b-a3b`` is the published Qwen/Qwen3-30B-A3B architecture. The ``tiny*`` presets
are random-init models small enough to train on two CPU cores in tests (they keep every
structural feature of the real one: GQA, QK-norm, top-k routing with renormalised
probabilities, untied embeddings, optional dense layers).
"""

from __future__ import annotations

import copy
from typing import Any

_QWEN3_30B_A3B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

_TINY: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    # 2 MoE layers, 8 experts top-2: the default test model.
    "tiny": _TINY,
    # layer 0 dense (Qwen3 mlp_only_layers), layer 1 MoE: exercises mixed layer specs.
    "tiny-dense-first": {**_TINY, "mlp_only_layers": [0]},
    # 4 MoE layers: enough to split over 2 pipeline stages.
    "tiny-4l": {**_TINY, "num_hidden_layers": 4},
    # hidden 128, 4 layers: the benchmark model (as in the megatron-core CPU notes).
    "small": {**_TINY, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
              "head_dim": 32, "moe_intermediate_size": 64},
}


def available_presets() -> list[str]:
    """Names accepted by ``ModelConfig.preset``."""
    return sorted(PRESETS)


def preset_kwargs(name: str) -> dict[str, Any]:
    """Return a copy of the ``Qwen3MoeConfig`` keyword arguments of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"model.preset '{name}' is unknown; available: {', '.join(available_presets())}")
    return copy.deepcopy(PRESETS[name])
