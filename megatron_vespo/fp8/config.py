"""Config of FP8 training through Transformer Engine (owned by ``fp8/``; GPU only)."""

from __future__ import annotations

from typing import Literal, Optional

from megatron_vespo.config.base import Section


class FP8Config(Section):
    """Megatron-Core FP8 settings (names as ``TransformerConfig``): ``fp8`` None disables FP8."""

    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "max"
