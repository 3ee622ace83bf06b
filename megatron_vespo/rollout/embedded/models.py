"""HF models for the embedded engine: random tiny checkpoints, loading, in-place weight reload.

``save_tiny_checkpoint`` writes a random-weight Qwen3-MoE (a ``models.presets`` architecture,
``tiny`` by default) as a standard HF directory (``config.json``, ``generation_config.json``,
``model.safetensors`` with per-expert tensor names as released Qwen3-MoE checkpoints have), so
the same directory serves the embedded engine, SGLang and the HF -> Megatron converter.
No tokenizer is written: the pipeline works on token ids.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_vespo.utils.imports import require
from megatron_vespo.utils.io import atomic_dir

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (ValueError names the choices)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def tiny_hf_config(preset: str = "tiny", **overrides: Any) -> Any:
    """``Qwen3MoeConfig`` of a ``models.presets`` architecture with ``overrides`` applied."""
    transformers = require("transformers", "the embedded rollout engine")
    from megatron_vespo.models.presets import preset_kwargs

    kwargs = preset_kwargs(preset)
    kwargs.update(overrides)
    return transformers.Qwen3MoeConfig(**kwargs)


def build_tiny_model(preset: str = "tiny", seed: int = 0, dtype: str | torch.dtype = "float32",
                     **overrides: Any) -> Any:
    """A random-weight ``Qwen3MoeForCausalLM`` (eval mode), reproducible from ``seed``."""
    transformers = require("transformers", "the embedded rollout engine")
    config = tiny_hf_config(preset, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.Qwen3MoeForCausalLM(config)
    return model.to(resolve_dtype(dtype)).eval()


def save_tiny_checkpoint(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                         dtype: str | torch.dtype = "float32", **overrides: Any) -> Path:
    """Write a random-weight HF checkpoint of ``preset`` to ``out_dir`` (atomically) and return it.

    Example: ``save_tiny_checkpoint("/tmp/tiny")`` then ``megatron-vespo serve --model-path /tmp/tiny``.
    """
    model = build_tiny_model(preset, seed=seed, dtype=dtype, **overrides)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    logger.info("wrote random %s checkpoint (seed %d) to %s", preset, seed, out)
    return out


def load_hf_model(model_path: str | os.PathLike, dtype: str | torch.dtype = "float32") -> Any:
    """``AutoModelForCausalLM.from_pretrained`` in eval mode; ValueError names a missing directory."""
    transformers = require("transformers", "the embedded rollout engine")
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model_path {path} is not an HF checkpoint directory (no config.json)")
    from megatron_vespo.fp8.serving import is_fp8_checkpoint
    from megatron_vespo.rollout.embedded.fp8_weights import load_fp8_hf_model

    if is_fp8_checkpoint(path):  # block-FP8 export (weight_sync.dtype=fp8): dequantised, SGLang's layout rules
        return load_fp8_hf_model(path, resolve_dtype(dtype))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype))
    return model.eval()


def load_tokenizer(model_path: Optional[str | os.PathLike]) -> Any:
    """The checkpoint's tokenizer if it ships one, else None (the engine then takes token ids only)."""
    if model_path is None:
        return None
    path = Path(model_path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    transformers = require("transformers", "the embedded rollout engine")
    return transformers.AutoTokenizer.from_pretrained(str(path))


@torch.no_grad()
def reload_weights_in_place(model: torch.nn.Module, model_path: str | os.PathLike) -> int:
    """Copy the weights of the HF checkpoint ``model_path`` into ``model``; returns tensors copied.

    All or nothing: the safetensors files are read directly and checked as a whole first
    (``weight_checks.validate_full_checkpoint``: no missing, unexpected, mis-shaped or
    non-finite tensor; corrupt files named), then copied in place so hooks and references to
    the model stay valid. Per-expert checkpoint names land in transformers' fused expert
    tensors (``weight_update.hf_param_views``). Raises ValueError naming what to fix.
    """
    from megatron_vespo.fp8.blockwise import dequantize_named_tensors
    from megatron_vespo.fp8.serving import checkpoint_fp8_block, served_fp8_block
    from megatron_vespo.rollout.embedded.weight_checks import read_checkpoint_tensors, validate_full_checkpoint
    from megatron_vespo.rollout.embedded.weight_update import hf_param_views, load_named_tensors

    config_path = Path(model_path) / "config.json"
    block = checkpoint_fp8_block(json.loads(config_path.read_text()), str(config_path)) if config_path.is_file() \
        else None
    if block != served_fp8_block(model):  # SGLang keeps the start-up format for every update
        raise ValueError(f"{model_path}: checkpoint FP8 block {block} but the engine serves "
                         f"{served_fp8_block(model)} (None = not FP8); restart the engine from a checkpoint of "
                         "the format it should serve")
    named = read_checkpoint_tensors(model_path)
    views = hf_param_views(model)
    try:  # block-FP8 export: checked as the engine serves it (dequantised); loaded as sent (FP8 + scales)
        checked = named if block is None else dequantize_named_tensors(named, dtype=next(model.parameters()).dtype,
                                                                        block=block)
        validate_full_checkpoint(model, views, checked)
    except ValueError as exc:
        raise ValueError(f"{model_path}: {exc}") from None
    return load_named_tensors(model, named, views, checked=True)  # validate_full_checkpoint ran every check
