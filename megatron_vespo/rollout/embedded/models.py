"""HF models for the embedded engine: random tiny checkpoints, loading, in-place weight reload.

``save_tiny_checkpoint`` writes a random-weight Qwen3-MoE (a ``models.presets`` architecture,
``tiny`` by default) as a standard HF directory (``config.json``, ``generation_config.json``,
``model.safetensors`` with per-expert tensor names as released Qwen3-MoE checkpoints have), so
the same directory serves the embedded engine, SGLang and the HF -> Megatron converter.
No tokenizer is written: the pipeline works on token ids.
"""

from __future__ import annotations

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

    Fast path: when the safetensors names cover the served model exactly (per-expert names of a
    fused ``gate_up_proj`` / ``down_proj`` included), the files are read and copied straight into
    the parameters (``weight_update.load_named_tensors``), no model is built. Otherwise loading
    goes through ``from_pretrained`` so transformers' other checkpoint conversions apply. Either
    way the copy is in place, so hooks and references to the model stay valid. Raises ValueError
    naming the file when names or shapes differ.
    """
    n = _reload_from_safetensors(model, model_path)
    if n is not None:
        return n
    dtype = next(model.parameters()).dtype
    hf_logging = require("transformers", "reloading HF weights").utils.logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per weight update floods the training log
    try:
        new = load_hf_model(model_path, dtype)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    src, dst = new.state_dict(), model.state_dict()
    missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or extra:
        raise ValueError(f"{model_path}: checkpoint does not match the served model "
                         f"(missing {missing[:5]}, unexpected {extra[:5]})")
    bad = [k for k in dst if dst[k].shape != src[k].shape]
    if bad:
        raise ValueError(f"{model_path}: shape mismatch for {bad[:5]} "
                         f"(e.g. {tuple(src[bad[0]].shape)} vs served {tuple(dst[bad[0]].shape)})")
    for k, t in dst.items():
        t.copy_(src[k])
    return len(dst)


def _reload_from_safetensors(model: torch.nn.Module, model_path: str | os.PathLike) -> Optional[int]:
    """Copy ``model_path``'s safetensors into ``model`` when their names cover it exactly, else None."""
    from megatron_vespo.rollout.embedded.weight_update import _FUSED, hf_param_views, load_named_tensors

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    from safetensors.torch import load_file

    named = [kv for f in files for kv in load_file(str(f)).items()]
    names = {n for n, _ in named}
    views = hf_param_views(model)
    if not names <= set(views):
        return None
    for key, t in model.state_dict().items():
        if key in names:
            continue
        m = _FUSED.fullmatch(key)
        kinds = ("gate_proj", "up_proj") if m is not None and m["kind"] == "gate_up_proj" else ("down_proj",)
        if m is None or t.dim() != 3 or not all(f"{m['prefix']}.{e}.{k}.weight" in names
                                                 for e in range(t.shape[0]) for k in kinds):
            return None  # not covered name by name (tied / renamed weights): from_pretrained path
    try:
        return load_named_tensors(model, named, views)
    except ValueError as exc:
        raise ValueError(f"{model_path}: {exc}") from None
