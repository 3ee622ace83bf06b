"""Config of FP8 training through Transformer Engine (owned by ``fp8/``; GPU only).

Field names are Megatron's: the ``TransformerConfig`` FP8 fields (``fp8`` is Megatron-LM's
``--fp8-format``) plus ``fp8_param_gather`` (Megatron-LM ``--fp8-param-gather``; it sets
``TransformerConfig.fp8_param`` and ``DistributedDataParallelConfig.fp8_param_gather``) and
``reuse_grad_buf_for_mxfp8_param_ag`` (DDP and optimizer config). ``fp8: null`` turns FP8 off
and every other field is then ignored, except the two that only make sense with FP8 on, which
are errors rather than silently dropped.

Rules Megatron-Core 0.16.1 / Transformer Engine enforce, repeated here so a YAML fails at load
time with the key to change instead of deep inside model construction:

* ``first_last_layers_bf16`` cannot be used with the ``delayed`` recipe
  (``transformer_config.py:990``: per-layer FP8 contexts break delayed scaling's amax reduction);
* ``reuse_grad_buf_for_mxfp8_param_ag`` needs ``fp8_recipe: mxfp8`` and ``fp8_param_gather``
  (``distributed_data_parallel_config.py:153``);
* ``fp8_param_gather`` needs ``fp8`` set (``transformer_config.py:1027``).

Hardware and library checks (GPU generation, Transformer Engine version) need the machine; see
``fp8/env.py``. Cross-section rules (distributed optimizer, parameter dtype, layers per
pipeline stage) are in ``fp8.te.check_fp8_job``.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from megatron_vespo.config.base import Section

#: recipes this config accepts (Megatron also has 'custom', which needs a quantizer factory)
RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


class FP8Config(Section):
    """Megatron-Core FP8 settings (``TransformerConfig`` names); ``fp8: null`` disables FP8.

    Recipes (``fp8_recipe``) and the hardware they need:

    * ``delayed``: per-tensor scales from an amax history; Ada/Hopper (sm89+). Megatron's default.
    * ``tensorwise``: per-tensor scales from the current tensor (current scaling); sm89+.
    * ``blockwise``: 1x128 / 128x128 block scales (DeepSeek-V3 style, what SGLang's FP8
      block-quantised checkpoints use); Hopper sm90+ with CUDA >= 12.9; on Blackwell TE
      >= 2.9 emulates it with MXFP8 (power-of-two scales).
    * ``mxfp8``: 32-element blocks with E8M0 scales; Blackwell only (sm100, sm103).

    Embedding, output layer and MoE routers never run in FP8 in Megatron (they are not
    Transformer Engine GEMMs).
    """

    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format (Megatron-LM ``--fp8-format``): e4m3 everywhere, or hybrid (e4m3 forward, e5m2 gradients);
    null turns FP8 training off."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """Scaling recipe: delayed, tensorwise, blockwise or mxfp8 (see the class docstring for the hardware)."""
    fp8_margin: int = Field(0, ge=0)
    """Delayed scaling: the scale leaves 2**margin headroom below the FP8 maximum."""
    fp8_amax_history_len: int = Field(1024, ge=1)
    """Delayed scaling: steps of amax history the scale is computed from."""
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "max"
    """Delayed scaling: the amax of the history to use (its maximum, or the most recent value)."""
    fp8_wgrad: bool = True
    """Run the weight-gradient GEMMs in FP8 too (false keeps them in BF16)."""
    fp8_param_gather: bool = False
    """Keep parameters in FP8 and all-gather them in FP8 (Megatron-LM ``--fp8-param-gather``; sets
    ``TransformerConfig.fp8_param`` and DDP's ``fp8_param_gather``); needs ``fp8``."""
    reuse_grad_buf_for_mxfp8_param_ag: bool = False
    """MXFP8 parameter all-gather through the gradient buffer (saves memory); needs mxfp8 and fp8_param_gather."""
    first_last_layers_bf16: bool = False
    """Keep the first and last transformer layers in BF16 (counts below); not with the delayed recipe."""
    num_layers_at_start_in_bf16: int = Field(1, ge=0)
    """With first_last_layers_bf16: transformer layers kept in BF16 at the start."""
    num_layers_at_end_in_bf16: int = Field(1, ge=0)
    """With first_last_layers_bf16: transformer layers kept in BF16 at the end."""
    emulate: bool = False
    """Run the recipe as quantise-dequantise on the local (non-TE) spec (CPU, CI, studies; ``fp8/emulate.py``):
    no Transformer Engine, no GPU, no FP8 parameters; not with the delayed recipe."""

    @property
    def enabled(self) -> bool:
        """True when FP8 training is on (``fp8`` is set)."""
        return self.fp8 is not None

    @model_validator(mode="after")
    def _megatron_rules(self) -> "FP8Config":
        if not self.enabled:
            if self.fp8_param_gather:
                raise ValueError("fp8.fp8_param_gather=true needs fp8.fp8 set (e4m3 or hybrid); Megatron keeps FP8 "
                                 "parameters only in FP8 mode")
            if self.reuse_grad_buf_for_mxfp8_param_ag:
                raise ValueError("fp8.reuse_grad_buf_for_mxfp8_param_ag=true needs fp8.fp8 set with "
                                 "fp8.fp8_recipe=mxfp8 and fp8.fp8_param_gather=true")
            return self
        if self.emulate and self.fp8_recipe == "delayed":
            raise ValueError("fp8.emulate=true does not emulate fp8.fp8_recipe=delayed (amax history); use "
                             "tensorwise, blockwise or mxfp8")
        if self.emulate and self.fp8_param_gather:
            raise ValueError("fp8.fp8_param_gather=true needs Transformer Engine FP8 parameters; fp8.emulate=true "
                             "keeps high-precision parameters (set one of them false)")
        if self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise ValueError("fp8.first_last_layers_bf16=true does not work with fp8.fp8_recipe=delayed (Megatron: "
                             "per-layer FP8 contexts break delayed scaling's amax reduction); use tensorwise, "
                             "blockwise or mxfp8")
        if self.reuse_grad_buf_for_mxfp8_param_ag and not (self.fp8_recipe == "mxfp8" and self.fp8_param_gather):
            raise ValueError("fp8.reuse_grad_buf_for_mxfp8_param_ag=true needs fp8.fp8_recipe=mxfp8 and "
                             f"fp8.fp8_param_gather=true (got fp8_recipe={self.fp8_recipe}, "
                             f"fp8_param_gather={self.fp8_param_gather})")
        return self
