"""FP8 training through Transformer Engine: config, machine checks, Megatron mapping, run reports.

``FP8Config`` (the ``fp8:`` section) -> ``check_fp8_job`` (config rules) ->
``check_fp8_environment`` (GPU / CUDA / Transformer Engine, before any model is built) ->
``fp8_transformer_overrides`` / ``fp8_ddp_kwargs`` / ``fp8_optimizer_kwargs`` (Megatron fields)
-> ``fp8_summary`` (what the run used). See ``docs/fp8.md``. Importing this package needs only torch.

Beyond Transformer Engine: ``fp8.blockwise`` (block-FP8 weights for an FP8 rollout engine in
SGLang's layout, the engine TP/EP block check; ``weight_sync.dtype=fp8``, ``convert mcore-to-hf
--fp8-blockwise``), ``fp8.serving`` (SGLang's FP8 rules in the embedded engine) and
``fp8.emulate`` (TE's recipes as quantise-dequantise on CPU, ``fp8.emulate=true``).
"""

from megatron_vespo.fp8.config import RECIPES, FP8Config
from megatron_vespo.fp8.env import REQUIREMENTS, FP8Environment, check_fp8_environment, fp8_advisories
from megatron_vespo.fp8.te import (
    check_fp8_job,
    check_fp8_model_dims,
    fp8_alignment,
    fp8_ddp_kwargs,
    fp8_optimizer_kwargs,
    fp8_overrides,
    fp8_summary,
    fp8_transformer_overrides,
    is_fp8_tensor,
    to_high_precision,
)

__all__ = [
    "RECIPES", "REQUIREMENTS", "FP8Config", "FP8Environment", "check_fp8_environment", "check_fp8_job",
    "check_fp8_model_dims", "fp8_advisories", "fp8_alignment", "fp8_ddp_kwargs", "fp8_optimizer_kwargs",
    "fp8_overrides", "fp8_summary", "fp8_transformer_overrides", "is_fp8_tensor", "to_high_precision",
]
