"""Qwen3-MoE architecture facts read from an HF ``config.json``: what the mapping, the FP8 layout
checks and the planner need, kept below them all (``checkpoint/mapping.py`` re-exports them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)
SUPPORTED_ARCHITECTURES = ("Qwen3MoeForCausalLM",)


@dataclass(frozen=True)
class Qwen3MoeDims:
    """The architecture facts the mapping needs, read from an HF ``config.json``."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    moe_intermediate_size: int
    intermediate_size: int
    moe_layers: frozenset
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any, source: str = "config") -> "Qwen3MoeDims":
        """Validate an HF config (dict or ``PretrainedConfig``) as Qwen3-MoE and extract dims.

        Raises ValueError naming ``source`` (usually the config.json path) and the offending field.
        """
        d = cfg if isinstance(cfg, Mapping) else cfg.to_dict()
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES and not set(archs) & set(SUPPORTED_ARCHITECTURES):
            raise ValueError(f"{source}: model_type={model_type!r} architectures={archs} is not supported; "
                             f"this converter handles {SUPPORTED_ARCHITECTURES} (model_type 'qwen3_moe')")
        if d.get("attention_bias"):
            raise ValueError(f"{source}: attention_bias=true is not supported for Qwen3-MoE conversion")

        def need(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if d.get(k) is not None:
                    return d[k]
            raise ValueError(f"{source}: missing field '{key}'")

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        n_layers = int(need("num_hidden_layers"))
        n_exp = int(need("num_experts", "num_local_experts"))
        step = int(d.get("decoder_sparse_step") or 1)
        mlp_only = set(d.get("mlp_only_layers") or [])
        moe_layers = frozenset(i for i in range(n_layers)
                               if i not in mlp_only and n_exp > 0 and (i + 1) % step == 0)
        return cls(
            num_layers=n_layers, hidden_size=hidden, num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            vocab_size=int(need("vocab_size")), num_experts=n_exp,
            moe_intermediate_size=int(need("moe_intermediate_size")) if n_exp else 0,
            intermediate_size=int(need("intermediate_size")),
            moe_layers=moe_layers, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )


def as_dims(cfg: Any) -> Qwen3MoeDims:
    """``Qwen3MoeDims`` from dims, an HF config dict or a ``PretrainedConfig`` (what callers have at hand)."""
    return cfg if isinstance(cfg, Qwen3MoeDims) else Qwen3MoeDims.from_hf_config(cfg)
