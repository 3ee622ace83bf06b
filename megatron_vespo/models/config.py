"""Config of the policy model (owned by ``models/``)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from megatron_vespo.config.base import Section


class ModelConfig(Section):
    """Which Qwen3-MoE model to build.

    Either ``preset`` (a named architecture, e.g. ``qwen3-30b-a3b`` or ``tiny``) or
    ``hf_path`` (a Hugging Face checkpoint directory with ``config.json``) must be set.
    ``hf_overrides`` patch fields of the Hugging Face config (e.g. ``num_hidden_layers``).
    ``transformer_overrides`` are extra Megatron ``TransformerConfig`` fields, Megatron names
    (e.g. ``recompute_granularity: full``, ``moe_aux_loss_coeff: 1e-3``); Megatron validates them.
    """

    preset: Optional[str] = "tiny"
    hf_path: Optional[str] = None
    hf_overrides: dict[str, Any] = Field(default_factory=dict)
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 1234
    transformer_overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.preset is None and self.hf_path is None:
            raise ValueError("set model.preset or model.hf_path")
        return self
