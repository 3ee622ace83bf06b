"""``FP8Config`` -> Megatron-Core: ``TransformerConfig``, DDP and optimizer fields, plus run reports.

::

    check_fp8_job(fp8, model_cfg, parallel, hf_cfg)        # config rules, no machine needed
    overrides = fp8_overrides(fp8)                          # machine check + TransformerConfig fields
    tf_config = hf_config_to_transformer_config(hf_cfg, parallel, **overrides)
    DistributedDataParallelConfig(..., **fp8_ddp_kwargs(fp8))
    OptimizerConfig(..., **fp8_optimizer_kwargs(fp8))
    logger.info(fp8_summary(tf_config, model))              # what the run actually used

What megatron_vespo sets (Megatron names): ``fp8``, ``fp8_recipe`` (the string; megatron-core
0.16.1 compares it with the ``Fp8Recipe`` str-enum), ``fp8_margin``, ``fp8_amax_history_len``,
``fp8_amax_compute_algo``, ``fp8_wgrad``, ``fp8_param`` (= ``fp8_param_gather``),
``first_last_layers_bf16`` and its two layer counts, and ``moe_router_dtype='fp32'`` (routing
logits and top-k in FP32: expert choice is the most precision-sensitive step of an MoE, and the
router is not an FP8 GEMM anyway). ``model.transformer_overrides`` are applied after these and
may not repeat the fields ``FP8Config`` owns (``check_fp8_job``).

Only Transformer Engine layers run in FP8: with the local (non-TE) spec Megatron's FP8 context
is a no-op, which is why FP8 requires Transformer Engine (``fp8/env.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from megatron_vespo.config.base import ConfigError
from megatron_vespo.fp8.config import FP8Config
from megatron_vespo.fp8.env import FP8Environment, check_fp8_environment

logger = logging.getLogger(__name__)

#: TransformerConfig fields that FP8Config owns (set them under ``fp8:``, not in transformer_overrides)
OWNED_FIELDS = ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_wgrad",
                "fp8_param", "first_last_layers_bf16", "num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16")


def fp8_transformer_overrides(cfg: Optional[FP8Config]) -> dict[str, Any]:
    """``TransformerConfig`` fields for ``cfg`` (Megatron names); {} when FP8 is off. Pure mapping."""
    if cfg is None or not cfg.enabled:
        return {}
    if cfg.emulate:  # quantise-dequantise on the local spec (fp8/emulate.py): Megatron itself stays BF16
        return {"moe_router_dtype": "fp32"}
    return {
        "fp8": cfg.fp8,
        "fp8_recipe": cfg.fp8_recipe,
        "fp8_margin": cfg.fp8_margin,
        "fp8_amax_history_len": cfg.fp8_amax_history_len,
        "fp8_amax_compute_algo": cfg.fp8_amax_compute_algo,
        "fp8_wgrad": cfg.fp8_wgrad,
        "fp8_param": cfg.fp8_param_gather,
        "first_last_layers_bf16": cfg.first_last_layers_bf16,
        "num_layers_at_start_in_bf16": cfg.num_layers_at_start_in_bf16,
        "num_layers_at_end_in_bf16": cfg.num_layers_at_end_in_bf16,
        "moe_router_dtype": "fp32",
    }


def fp8_overrides(cfg: Optional[FP8Config], env: Optional[FP8Environment] = None) -> dict[str, Any]:
    """``check_fp8_environment`` then ``fp8_transformer_overrides``: what the actor passes to the model.

    Raises ConfigError naming the field when this machine (``env``, default: detected) cannot
    run ``cfg``; returns {} when FP8 is off.
    """
    if cfg is None or not cfg.enabled:
        return {}
    if not cfg.emulate:  # emulation needs no GPU / TE
        check_fp8_environment(cfg, env)
    return fp8_transformer_overrides(cfg)


def fp8_ddp_kwargs(cfg: Optional[FP8Config]) -> dict[str, Any]:
    """``DistributedDataParallelConfig`` fields: FP8 parameter all-gather (and MXFP8 buffer reuse)."""
    if cfg is None or not cfg.enabled or cfg.emulate:
        return {}
    return {"fp8_param_gather": cfg.fp8_param_gather,
            "reuse_grad_buf_for_mxfp8_param_ag": cfg.reuse_grad_buf_for_mxfp8_param_ag}


def fp8_optimizer_kwargs(cfg: Optional[FP8Config]) -> dict[str, Any]:
    """``OptimizerConfig`` fields: the recipe (the distributed optimizer shards FP8 params by it)."""
    if cfg is None or not cfg.enabled or cfg.emulate:
        return {}
    return {"fp8_recipe": cfg.fp8_recipe,
            "reuse_grad_buf_for_mxfp8_param_ag": cfg.reuse_grad_buf_for_mxfp8_param_ag}


def fp8_alignment(cfg: Optional[FP8Config]) -> int:
    """GEMM dimension multiple FP8 needs: 1 (off), 16, or 32 for MXFP8 (megatron ``get_fp8_align_size``)."""
    if cfg is None or not cfg.enabled:
        return 1
    return 32 if cfg.fp8_recipe == "mxfp8" else 16


def check_fp8_job(cfg: Optional[FP8Config], model_cfg: Any = None, parallel: Any = None,
                  hf_cfg: Any = None) -> None:
    """Cross-section FP8 rules that need no GPU; ConfigError names the field to change.

    Args:
        model_cfg: ``ModelConfig`` (parameter dtype, transformer_overrides).
        parallel: ``ParallelConfig`` (distributed optimizer, TP / ETP / PP sizes).
        hf_cfg: the Hugging Face model config, when at hand: layer counts and GEMM dims.
    """
    if cfg is None or not cfg.enabled:
        return
    if model_cfg is not None:
        dup = sorted(set(model_cfg.transformer_overrides) & set(OWNED_FIELDS))
        if dup:
            raise ConfigError(f"model.transformer_overrides.{dup[0]}: FP8 is configured in the fp8 section "
                              f"(fp8.{'fp8_param_gather' if dup[0] == 'fp8_param' else dup[0]}) so its checks see it")
        router = model_cfg.transformer_overrides.get("moe_router_dtype", "fp32")
        if router != "fp32":
            logger.warning("model.transformer_overrides.moe_router_dtype=%s under FP8: fp32 routing is recommended "
                           "(expert choice is the most precision-sensitive step)", router)
        if cfg.fp8_param_gather and model_cfg.params_dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"fp8.fp8_param_gather=true needs model.params_dtype=bfloat16 (got "
                              f"{model_cfg.params_dtype}): Megatron's distributed optimizer keeps FP32 main weights "
                              "only for 16-bit / FP8 model parameters")
    if parallel is not None and cfg.fp8_param_gather and not parallel.use_distributed_optimizer:
        raise ConfigError("fp8.fp8_param_gather=true needs parallel.use_distributed_optimizer=true: only Megatron's "
                          "distributed optimizer re-quantises FP8 parameters from its FP32 main weights after a step "
                          "(otherwise they would never change)")
    if hf_cfg is not None:
        pp = parallel.pipeline_model_parallel_size if parallel is not None else 1
        per_stage = hf_cfg.num_hidden_layers // pp
        if cfg.first_last_layers_bf16:
            for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
                if getattr(cfg, name) > per_stage:
                    raise ConfigError(f"fp8.{name}={getattr(cfg, name)} exceeds the layers per pipeline stage "
                                      f"({hf_cfg.num_hidden_layers} layers / pipeline_model_parallel_size {pp} "
                                      f"= {per_stage})")
        check_fp8_model_dims(cfg, hf_cfg, parallel)


def check_fp8_model_dims(cfg: FP8Config, hf_cfg: Any, parallel: Any = None) -> None:
    """Every FP8 GEMM dimension of this rank's shard must be a multiple of ``fp8_alignment`` (TE asserts it)."""
    align = fp8_alignment(cfg)
    tp = parallel.tensor_model_parallel_size if parallel is not None else 1
    etp = (parallel.expert_tensor_parallel_size or tp) if parallel is not None else 1
    head_dim = int(getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads)
    dims = {
        "hidden_size": hf_cfg.hidden_size,
        "num_attention_heads * head_dim / tensor_model_parallel_size": hf_cfg.num_attention_heads * head_dim // tp,
        "num_key_value_heads * head_dim / tensor_model_parallel_size": hf_cfg.num_key_value_heads * head_dim // tp,
        "intermediate_size / tensor_model_parallel_size": hf_cfg.intermediate_size // tp,
    }
    if int(getattr(hf_cfg, "num_experts", 0) or 0):
        dims["moe_intermediate_size / expert_tensor_parallel_size"] = hf_cfg.moe_intermediate_size // etp
    for name, value in dims.items():
        if value % align:
            raise ConfigError(f"fp8.fp8_recipe={cfg.fp8_recipe} needs every GEMM dimension to be a multiple of "
                              f"{align}; the model's {name} = {value} is not")


# ----------------------------------------------------------------------------- tensors and reports
def is_fp8_tensor(t: Any) -> bool:
    """True for a Transformer Engine quantised tensor (an FP8 parameter); False without TE."""
    try:
        from megatron.core.fp8_utils import is_float8tensor
    except ImportError:
        return False
    return bool(is_float8tensor(t))


def to_high_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` dequantised to its nominal dtype when it is an FP8 parameter, else ``t`` itself.

    The values are the FP8-rounded weights the forward pass used (the FP32 main weights live
    in the optimizer).
    """
    if not is_fp8_tensor(t):
        return t
    from megatron.core.fp8_utils import dequantize_fp8_tensor

    return dequantize_fp8_tensor(t)


def _recipe_name(recipe: Any) -> Optional[str]:
    return None if recipe is None else str(getattr(recipe, "value", recipe))


def fp8_summary(tf_config: Any, model: Any = None, env: Optional[FP8Environment] = None) -> dict[str, Any]:
    """What FP8 settings a run actually used, read back from Megatron's ``TransformerConfig``.

    JSON-friendly ``{"fp8/...": value}``; numeric entries (``fp8/enabled``,
    ``fp8/bf16_layer_count``, ``fp8/fp8_param_tensors``) can go into metrics. ``model`` (chunks or
    one module) adds how many parameters are stored in FP8; ``env`` adds the machine.
    """
    enabled = bool(getattr(tf_config, "fp8", None))
    out: dict[str, Any] = {"fp8/enabled": float(enabled), "fp8/format": getattr(tf_config, "fp8", None)}
    if enabled:
        from megatron.core.fp8_utils import is_first_last_bf16_layer

        n = int(tf_config.num_layers)
        bf16 = [i for i in range(n) if is_first_last_bf16_layer(tf_config, i)]
        recipe = _recipe_name(tf_config.fp8_recipe)
        out.update({
            "fp8/recipe": recipe,
            "fp8/param": bool(tf_config.fp8_param),
            "fp8/wgrad": bool(tf_config.fp8_wgrad),
            "fp8/bf16_layers": bf16,
            "fp8/bf16_layer_count": float(len(bf16)),
            "fp8/moe_router_dtype": getattr(tf_config, "moe_router_dtype", None),
        })
        if recipe == "delayed":
            out.update({"fp8/amax_history_len": tf_config.fp8_amax_history_len,
                        "fp8/amax_compute_algo": tf_config.fp8_amax_compute_algo,
                        "fp8/margin": tf_config.fp8_margin})
    if model is not None:
        chunks = model if isinstance(model, (list, tuple)) else [model]
        params = [p for m in chunks for p in m.parameters()]
        out["fp8/fp8_param_tensors"] = float(sum(is_fp8_tensor(p) for p in params))
    if env is not None:
        out.update({f"fp8/env/{k}": v for k, v in env.as_dict().items() if k != "te_error"})
    return out
