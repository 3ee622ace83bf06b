"""Qwen3-MoE as a Megatron-Core ``GPTModel``.

Maps a Hugging Face ``Qwen3MoeConfig`` (transformers) onto a Megatron ``TransformerConfig``
plus a GPT decoder-block spec and builds the model. Mapping (HF -> Megatron):

* GQA: ``num_attention_heads`` -> ``num_attention_heads``, ``num_key_value_heads`` ->
  ``num_query_groups``, ``head_dim`` -> ``kv_channels``; QK-norm -> ``qk_layernorm``.
* RoPE: ``rope_parameters["rope_theta"]`` (transformers v5; ``rope_theta`` in v4) ->
  ``GPTModel(rotary_base=...)``, non-interleaved (HF ``rotate_half``) = Megatron default.
* MoE: ``num_experts``/``num_experts_per_tok``/``moe_intermediate_size`` ->
  ``num_moe_experts``/``moe_router_topk``/``moe_ffn_hidden_size``. HF takes a softmax over
  all experts, then top-k, then renormalises when ``norm_topk_prob``: that is Megatron's
  post-top-k softmax (``moe_router_pre_softmax=False``); without renormalisation it is the
  pre-softmax router. Router math in fp32 as HF does (``moe_router_dtype='fp32'``).
* Dense layers: ``mlp_only_layers`` and ``decoder_sparse_step`` -> ``moe_layer_freq`` list
  (1 = MoE, 0 = dense MLP of width ``intermediate_size``).
* No biases (``add_bias_linear=False``, ``add_qkv_bias=attention_bias``), RMSNorm with
  ``rms_norm_eps``, SwiGLU (``gated_linear_unit`` + SiLU), untied embeddings.

Spec: Transformer Engine layers when TE imports and CUDA is present (``moe_grouped_gemm``),
Megatron's local layers otherwise. Parameter names differ between the two; see
``docs/megatron.md`` ("Parameter names") for the table the checkpoint converter relies on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_vespo.config.base import ConfigError
from megatron_vespo.models.config import ModelConfig
from megatron_vespo.models.presets import preset_kwargs
from megatron_vespo.parallel.config import ParallelConfig
from megatron_vespo.utils.imports import is_available, require

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get_hf_config(model_cfg: ModelConfig) -> Any:
    """Return the ``transformers.Qwen3MoeConfig`` described by ``model_cfg``.

    ``model.hf_path`` (a checkpoint directory with ``config.json``) wins over ``model.preset``;
    ``model.hf_overrides`` then patch individual fields (unknown field names are errors).
    """
    transformers = require("transformers", "building the Qwen3-MoE config")
    if model_cfg.hf_path is not None:
        path = Path(model_cfg.hf_path)
        # a local-looking path that is missing would reach the Hub and come back as a repo-id error
        if not path.is_dir() and (path.is_absolute() or model_cfg.hf_path.startswith(".")
                                  or model_cfg.hf_path.count("/") != 1):
            raise ConfigError(f"model.hf_path '{model_cfg.hf_path}': no such directory "
                              "(a Hugging Face checkpoint directory with config.json)")
        try:
            cfg = transformers.AutoConfig.from_pretrained(model_cfg.hf_path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.hf_path '{model_cfg.hf_path}': cannot read config.json ({exc})") from exc
        if getattr(cfg, "model_type", None) != "qwen3_moe":
            raise ConfigError(f"model.hf_path '{model_cfg.hf_path}' holds model_type "
                              f"'{getattr(cfg, 'model_type', None)}', expected 'qwen3_moe'")
    else:
        try:
            kwargs = preset_kwargs(model_cfg.preset)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        cfg = transformers.Qwen3MoeConfig(**kwargs)
    known = set(cfg.to_dict()) | {"rope_theta", "head_dim"}
    for key, value in model_cfg.hf_overrides.items():
        if key not in known:
            raise ConfigError(f"model.hf_overrides.{key}: Qwen3MoeConfig has no field '{key}'")
        if key == "rope_theta":  # v4 spelling; v5 keeps it inside rope_parameters
            cfg.rope_parameters = {**(getattr(cfg, "rope_parameters", None) or {}), "rope_theta": float(value)}
        else:
            setattr(cfg, key, value)
    return cfg


def rope_theta(hf_cfg: Any) -> float:
    """RoPE base from a Qwen3 config (transformers v5 ``rope_parameters`` or v4 ``rope_theta``)."""
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    if getattr(hf_cfg, "rope_theta", None) is not None:
        return float(hf_cfg.rope_theta)
    return 10000.0


def head_dim(hf_cfg: Any) -> int:
    """Per-head width (Qwen3 sets it explicitly; 128 for every released size)."""
    return int(getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads)


def moe_layer_pattern(hf_cfg: Any) -> list[int]:
    """Per-layer 1 (MoE) / 0 (dense MLP), following ``Qwen3MoeDecoderLayer``'s rule."""
    mlp_only = set(getattr(hf_cfg, "mlp_only_layers", None) or [])
    step = int(getattr(hf_cfg, "decoder_sparse_step", 1) or 1)
    n_exp = int(getattr(hf_cfg, "num_experts", 0) or 0)
    return [int(i not in mlp_only and n_exp > 0 and (i + 1) % step == 0) for i in range(hf_cfg.num_hidden_layers)]


def num_moe_layers(hf_cfg: Any) -> int:
    """L: number of MoE layers (the L of routed_experts [.., L, K])."""
    return sum(moe_layer_pattern(hf_cfg))


def use_transformer_engine() -> bool:
    """True when Transformer Engine imports and a CUDA device is present."""
    return torch.cuda.is_available() and is_available("transformer_engine")


def validate_layout(hf_cfg: Any, parallel: ParallelConfig, world_size: Optional[int] = None) -> None:
    """Raise ConfigError naming the field when ``parallel`` cannot split this model."""
    tp, pp, ep = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.expert_model_parallel_size)
    etp = parallel.expert_tensor_parallel_size or tp
    cp = parallel.context_parallel_size
    checks = [
        ("tensor_model_parallel_size", tp, "num_attention_heads", hf_cfg.num_attention_heads),
        ("tensor_model_parallel_size", tp, "num_key_value_heads", hf_cfg.num_key_value_heads),
        ("tensor_model_parallel_size", tp, "vocab_size", hf_cfg.vocab_size),
        ("tensor_model_parallel_size", tp, "intermediate_size", hf_cfg.intermediate_size),
        ("pipeline_model_parallel_size", pp, "num_hidden_layers", hf_cfg.num_hidden_layers),
    ]
    if num_moe_layers(hf_cfg):
        checks += [
            ("expert_model_parallel_size", ep, "num_experts", hf_cfg.num_experts),
            ("expert_tensor_parallel_size", etp, "moe_intermediate_size", hf_cfg.moe_intermediate_size),
        ]
    for pname, pval, mname, mval in checks:
        if mval % pval:
            raise ConfigError(f"parallel.{pname}={pval} does not divide the model's {mname}={mval}")
    if parallel.sequence_parallel is False and tp > 1 and num_moe_layers(hf_cfg):
        # moe_layer.py:380 refuses to train MoE under TP without SP.
        raise ConfigError("parallel.sequence_parallel must be true when tensor_model_parallel_size > 1 "
                          "with MoE layers (megatron-core requires it for training)")
    if cp > 1 and not use_transformer_engine():
        raise ConfigError("parallel.context_parallel_size > 1 needs Transformer Engine attention (GPU only)")
    if world_size is not None:
        parallel.check_world_size(world_size)


def hf_config_to_transformer_config(hf_cfg: Any, parallel: ParallelConfig, **overrides: Any) -> Any:
    """Build the Megatron ``TransformerConfig`` for a Qwen3-MoE ``hf_cfg`` under ``parallel``.

    ``overrides`` are ``TransformerConfig`` fields (Megatron names, validated by Megatron),
    e.g. ``params_dtype=torch.bfloat16``, ``moe_enable_routing_replay=True``,
    ``recompute_granularity='full'``, ``fp8='hybrid'``.
    """
    tcore = require("megatron.core.transformer", "building the Megatron model config")
    validate_layout(hf_cfg, parallel)
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act '{hf_cfg.hidden_act}' is not supported (Qwen3 uses silu)")
    pattern = moe_layer_pattern(hf_cfg)
    te = use_transformer_engine()
    params_dtype = overrides.pop("params_dtype", torch.float32)
    if isinstance(params_dtype, str):
        params_dtype = _DTYPES[params_dtype]
    kwargs: dict[str, Any] = dict(
        num_layers=hf_cfg.num_hidden_layers,
        hidden_size=hf_cfg.hidden_size,
        ffn_hidden_size=hf_cfg.intermediate_size,
        num_attention_heads=hf_cfg.num_attention_heads,
        num_query_groups=hf_cfg.num_key_value_heads,
        kv_channels=head_dim(hf_cfg),
        normalization="RMSNorm",
        layernorm_epsilon=hf_cfg.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(getattr(hf_cfg, "attention_bias", False)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_cfg, "initializer_range", 0.02),
        attention_softmax_in_fp32=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # layout (Megatron names, straight from ParallelConfig)
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size or parallel.tensor_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # every micro-batch of one schedule call is padded to the same length, so pipeline p2p
        # shapes are fixed per call (variable_seq_lengths would also rule out the allgather
        # dispatcher, transformer_config.py:1829)
        variable_seq_lengths=False,
        # fusions need CUDA kernels (or torch.compile on CPU): off unless TE is present
        bias_activation_fusion=te,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    if any(pattern):
        kwargs.update(
            num_moe_experts=hf_cfg.num_experts,
            moe_router_topk=hf_cfg.num_experts_per_tok,
            moe_ffn_hidden_size=hf_cfg.moe_intermediate_size,
            moe_layer_freq=pattern,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not bool(getattr(hf_cfg, "norm_topk_prob", False)),
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type=parallel.moe_token_dispatcher_type,
            moe_grouped_gemm=te,
        )
    kwargs.update(overrides)
    if kwargs.get("moe_aux_loss_coeff", 0.0) and kwargs.get("moe_router_load_balancing_type") == "none":
        kwargs["moe_router_load_balancing_type"] = "aux_loss"
    try:
        return tcore.TransformerConfig(**kwargs)
    except TypeError as exc:  # unknown override name
        raise ConfigError(f"TransformerConfig override rejected: {exc}") from exc


def get_layer_spec(tf_config: Any, use_te: Optional[bool] = None, vp_stage: Optional[int] = None) -> Any:
    """Decoder-block spec for this pipeline stage: TE layers if ``use_te`` (auto), else local."""
    specs = require("megatron.core.models.gpt.gpt_layer_specs", "building the layer spec")
    if use_te is None:
        use_te = use_transformer_engine()
    spec = specs.get_gpt_decoder_block_spec(tf_config, use_transformer_engine=use_te,
                                            normalization="RMSNorm", vp_stage=vp_stage)
    if not use_te:  # local spec: the CPU experts skip Megatron's per-expert wrappers (same bits; cpu_experts.py)
        from megatron_vespo.models.cpu_attention import use_cpu_attention
        from megatron_vespo.models.cpu_experts import use_cpu_experts

        use_cpu_experts(spec)
        use_cpu_attention(spec)  # torch's fused SDPA kernel where it is the same math (cpu_attention.py)
    return spec


def build_gpt_model(
    hf_cfg: Any,
    parallel: ParallelConfig,
    *,
    params_dtype: str | torch.dtype = "float32",
    routing_replay: bool = False,
    use_te: Optional[bool] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    **overrides: Any,
) -> Any:
    """Build this rank's ``GPTModel`` shard (parallel_state must be initialised).

    Args:
        hf_cfg: a ``transformers.Qwen3MoeConfig`` (see ``get_hf_config``).
        parallel: the layout; must match ``parallel_state``.
        params_dtype: parameter dtype ("float32", "bfloat16", "float16" or a torch dtype).
        routing_replay: build routers with megatron-core's RouterReplay (R2/R3).
        use_te: force Transformer Engine layers on/off (default: TE iff importable with CUDA).
        pre_process / post_process: embedding / output layer on this stage (default: first /
            last pipeline stage).
        vp_stage: virtual pipeline stage index (interleaved schedules).
        overrides: extra ``TransformerConfig`` fields.

    Returns the model on the current device (CPU, or the current CUDA device), in train mode.
    Megatron names of the parameters: ``embedding.word_embeddings.weight``,
    ``decoder.layers.{i}.self_attention.linear_qkv.weight`` ... (``docs/megatron.md``).
    """
    require("megatron.core", "building the Megatron model")
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.moe.router_replay import RouterReplay

    if use_te and not is_available("transformer_engine"):
        raise ConfigError("use_te=True but transformer_engine cannot be imported (GPU only)")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != parallel.tensor_model_parallel_size:
            raise ConfigError("parallel.tensor_model_parallel_size differs from the initialised parallel_state")
        validate_layout(hf_cfg, parallel, torch.distributed.get_world_size())
    tf_config = hf_config_to_transformer_config(
        hf_cfg, parallel, params_dtype=params_dtype, moe_enable_routing_replay=routing_replay, **overrides)
    if use_te is None:
        use_te = use_transformer_engine()
    spec = get_layer_spec(tf_config, use_te=use_te, vp_stage=vp_stage)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    # RouterReplay keeps a class-level list of every router ever built; a second model would
    # append to the first one's list. Our replay controller addresses each model's own routers
    # (routing/replay.py), so the global list is only a leak: clear it before building.
    RouterReplay.clear_global_router_replay_instances()
    model = GPTModel(
        config=tf_config,
        transformer_layer_spec=spec,
        vocab_size=hf_cfg.vocab_size,
        max_sequence_length=hf_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=rope_theta(hf_cfg),
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    logger.info("built Qwen3-MoE GPTModel: %d layers on this stage, %s spec, %.2fM params on this rank",
                len(model.decoder.layers), "TE" if use_te else "local",
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def build_model_from_config(model_cfg: ModelConfig, parallel: ParallelConfig, *, routing_replay: bool = False,
                            **overrides: Any) -> Any:
    """``build_gpt_model(get_hf_config(model_cfg), parallel, ...)`` with the config's dtype."""
    return build_gpt_model(get_hf_config(model_cfg), parallel, params_dtype=model_cfg.params_dtype,
                           routing_replay=routing_replay, **{**model_cfg.transformer_overrides,
                                                             **model_cfg.recompute_fields(), **overrides})
