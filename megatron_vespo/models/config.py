"""Config of the policy model (owned by ``models/``)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from megatron_vespo.config.base import Section


class ModelConfig(Section):
    """Which Qwen3-MoE model to build.

    Either ``preset`` or ``hf_path`` must be set. The ``recompute_*`` fields are megatron-core
    0.16.1 ``TransformerConfig`` fields with the same names and rules
    (``transformer/transformer_config.py`` ``__post_init__``); full / uniform / 1 is what slime's
    Qwen3-30B-A3B recipe uses on 8 x H100.
    """

    preset: Optional[str] = "tiny"
    """Named architecture (e.g. qwen3-30b-a3b or tiny); this or hf_path must be set."""
    hf_path: Optional[str] = None
    """Hugging Face checkpoint directory with config.json."""
    hf_overrides: dict[str, Any] = Field(default_factory=dict)
    """Fields of the Hugging Face config to patch (e.g. num_hidden_layers)."""
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the trainer's parameters."""
    seed: int = 1234
    """Seed of the random initialisation (presets without weights)."""
    transformer_overrides: dict[str, Any] = Field(default_factory=dict)
    """Extra Megatron TransformerConfig fields, Megatron names (e.g. moe_aux_loss_coeff: 1e-3); Megatron validates
    them."""
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    """Activation recomputation: full (recompute whole layers in backward, keeping only each layer's input; needs
    recompute_method and recompute_num_layers) or selective (core attention only, takes neither)."""
    recompute_method: Optional[Literal["uniform", "block"]] = None
    """full recompute: uniform (every recompute_num_layers layers form one chunk) or block (the first
    recompute_num_layers of each stage)."""
    recompute_num_layers: Optional[int] = Field(None, ge=1)
    """Layers per recomputed chunk (uniform) or recomputed layers per stage (block)."""

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.preset is None and self.hf_path is None:
            raise ValueError("set model.preset or model.hf_path")
        return self

    @model_validator(mode="after")
    def _recompute(self) -> "ModelConfig":
        dup = sorted(set(RECOMPUTE_FIELDS) & set(self.transformer_overrides))
        if dup and self.recompute_granularity is not None:
            raise ValueError(f"model.transformer_overrides.{dup[0]} and model.recompute_granularity are both set: "
                             f"set recompute only through model.recompute_* (one place per field)")
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g is None and (m is not None or n is not None):
            raise ValueError("model.recompute_method / model.recompute_num_layers are set but "
                             "model.recompute_granularity is not: set it to 'full' (or drop them)")
        if g == "full" and (m is None or n is None):
            raise ValueError("model.recompute_granularity=full needs model.recompute_method (uniform or block) and "
                             "model.recompute_num_layers (e.g. uniform and 1, slime's Qwen3-30B-A3B recipe)")
        if g == "selective" and (m is not None or n is not None):
            raise ValueError("model.recompute_granularity=selective recomputes core attention only: drop "
                             "model.recompute_method and model.recompute_num_layers (Megatron rejects num_layers)")
        return self

    def recompute_fields(self, layers_per_stage: Optional[int] = None) -> dict[str, Any]:
        """The ``TransformerConfig`` recompute fields that are set (empty when recompute is off).

        ``layers_per_stage`` (decoder layers on one pipeline stage) bounds ``recompute_num_layers``
        as Megatron's documentation states (1 .. num_layers / pipeline_model_parallel_size).
        """
        if self.recompute_granularity is None:
            return {}
        n = self.recompute_num_layers
        if n is not None and layers_per_stage is not None and n > layers_per_stage:
            raise ValueError(f"model.recompute_num_layers={n} exceeds the {layers_per_stage} decoder layers of one "
                             "pipeline stage")
        return {k: getattr(self, k) for k in RECOMPUTE_FIELDS if getattr(self, k) is not None}


#: TransformerConfig fields ModelConfig owns (megatron-core 0.16.1 names)
RECOMPUTE_FIELDS = ("recompute_granularity", "recompute_method", "recompute_num_layers")
