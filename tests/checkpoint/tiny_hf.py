"""A tiny random Qwen3-MoE Hugging Face checkpoint for the checkpoint tests (written with transformers)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
            norm_topk_prob=True, max_position_embeddings=128, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def make_tiny_hf(path: str | Path, seed: int = 0, max_shard_size: str = "150KB", dtype: torch.dtype = torch.float32,
                 **overrides) -> Path:
    """Save a random tiny Qwen3MoeForCausalLM (sharded safetensors + index + tokenizer-like side files).

    Every weight is random (HF initialises routers to zero, which would make top-k routing a tie).
    """
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    path = Path(path)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}\n')
    return path
