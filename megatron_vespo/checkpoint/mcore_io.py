"""Megatron model checkpoints (dist_checkpointing, torch_dist backend) and HF export of a live model.

A *model checkpoint directory* (what ``convert hf-to-mcore`` writes, and what every training
``iter_XXXXXXX`` directory contains)::

    megatron_vespo_checkpoint.json   format version, params dtype, layout it was saved under
    model/                           dist_checkpointing torch_dist files (layout-independent:
                                     loads under any TP/EP/PP layout)
    hf/                              config.json + tokenizer / generation files, passed through

``save_hf_checkpoint`` writes a Hugging Face directory from a (sharded) live model, atomically;
it is what ``convert mcore-to-hf`` and disk-based weight sync use.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_vespo.checkpoint import dist
from megatron_vespo.checkpoint.export import DEFAULT_BUCKET_BYTES, ShardLayout, iter_hf_weights, unwrap_model
from megatron_vespo.checkpoint.hf_io import ShardedSafetensorsWriter, copy_side_files, read_hf_config
from megatron_vespo.checkpoint.mapping import Qwen3MoeDims
from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)

#: what a failed ``dist_checkpointing.load`` raises (catch these, re-raise naming the checkpoint);
#: torch.distributed.checkpoint's CheckpointException derives from BaseException, not Exception
LOAD_ERRORS = (Exception, CheckpointException)

META_NAME = "megatron_vespo_checkpoint.json"
FORMAT_VERSION = 1
MODEL_SUBDIR = "model"
HF_SUBDIR = "hf"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of HF configs and ModelConfig)."""
    return _DTYPE_NAMES[dtype]


def parse_dtype(name: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """``"bfloat16"`` / ``"bf16"`` / a torch dtype -> torch dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    key = aliases.get(str(name), str(name))
    for dtype, dname in _DTYPE_NAMES.items():
        if dname == key:
            return dtype
    raise ValueError(f"unsupported dtype '{name}' (use float32, bfloat16 or float16)")


def config_dtype(cfg: Mapping[str, Any]) -> Optional[torch.dtype]:
    """The dtype an HF config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    try:
        return parse_dtype(name) if name else None
    except ValueError:
        return None


def hf_config_dict(hf_cfg: Any) -> dict:
    """A plain dict of an HF config (``PretrainedConfig`` or mapping)."""
    return dict(hf_cfg) if isinstance(hf_cfg, Mapping) else hf_cfg.to_dict()


def strip_extra_state(sharded: dict) -> dict:
    """``sharded`` without the ``*._extra_state`` entries (what every model save / load here uses)."""
    # ``_extra_state`` holds Transformer Engine FP8 metadata (empty for local layers). Its
    # sharded-object ids depend on the layout, which would tie a checkpoint to one TP/EP layout.
    return {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}


# ----------------------------------------------------------------------------- model checkpoints
def write_model_checkpoint(model: Any, ckpt_dir: Path, hf_cfg: Any, *, source_dir: Optional[str] = None,
                           extra_meta: Optional[dict] = None) -> None:
    """Write ``model/``, ``hf/`` and the metadata file into the existing directory ``ckpt_dir`` (collective)."""
    from megatron.core import dist_checkpointing

    from megatron_vespo.checkpoint.compat import apply_dist_ckpt_cpu_compat

    apply_dist_ckpt_cpu_compat()
    gpt = unwrap_model(model)
    model_dir = Path(ckpt_dir) / MODEL_SUBDIR
    if dist.rank() == 0:
        model_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(strip_extra_state(gpt.sharded_state_dict()), str(model_dir))
    if dist.rank() == 0:
        hf_dir = Path(ckpt_dir) / HF_SUBDIR
        hf_dir.mkdir(exist_ok=True)
        if source_dir is not None:
            copy_side_files(source_dir, hf_dir)
        else:
            (hf_dir / "config.json").write_text(json.dumps(hf_config_dict(hf_cfg), indent=2, default=str) + "\n")
        layout = ShardLayout.current()
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "megatron_vespo.model",
            "params_dtype": dtype_name(next(gpt.parameters()).dtype),
            "saved_layout": {"tp": layout.tp_size, "ep": layout.ep_size, "etp": layout.etp_size,
                             "pp": layout.pp_size},
            "megatron_core": _megatron_version(),
            **(extra_meta or {}),
        }
        (Path(ckpt_dir) / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    dist.barrier()


def save_model_checkpoint(model: Any, out_dir: str | os.PathLike, hf_cfg: Any, *, source_dir: Optional[str] = None,
                          extra_meta: Optional[dict] = None,
                          verify_fn: Optional[Callable[[Path], None]] = None) -> Path:
    """Atomically write a model checkpoint directory at ``out_dir`` (collective).

    ``verify_fn(tmp_dir)`` runs (on every rank) before the rename; if it raises, nothing is written.
    """
    with dist.dist_atomic_dir(out_dir) as tmp:
        write_model_checkpoint(model, tmp, hf_cfg, source_dir=source_dir, extra_meta=extra_meta)
        if verify_fn is not None:
            verify_fn(tmp)
    return Path(out_dir)


def read_checkpoint_meta(ckpt_dir: str | os.PathLike) -> dict:
    """Validate a model checkpoint directory and return its metadata (ValueError names the file)."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META_NAME
    if not meta_path.is_file():
        raise ValueError(f"{ckpt_dir}: no {META_NAME}; not a megatron_vespo model checkpoint "
                         "(expected the output of 'convert hf-to-mcore' or a training iter_* directory)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path}: not valid JSON ({exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    for sub, marker in ((MODEL_SUBDIR, "metadata.json"), (HF_SUBDIR, "config.json")):
        if not (ckpt_dir / sub / marker).is_file():
            raise ValueError(f"{ckpt_dir / sub / marker} is missing (incomplete checkpoint)")
    return meta


def checkpoint_hf_config(ckpt_dir: str | os.PathLike) -> tuple[dict, Qwen3MoeDims]:
    """``(config dict, dims)`` of the HF config stored in a model checkpoint."""
    cfg = read_hf_config(Path(ckpt_dir) / HF_SUBDIR)
    return cfg, Qwen3MoeDims.from_hf_config(cfg, source=str(Path(ckpt_dir) / HF_SUBDIR / "config.json"))


def load_model_checkpoint(model: Any, ckpt_dir: str | os.PathLike) -> dict:
    """Load the ``model/`` part of a checkpoint into ``model`` under the current layout (collective).

    Every tensor the model needs must be in the checkpoint and vice versa (strict); returns the metadata.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_vespo.checkpoint.compat import apply_dist_ckpt_cpu_compat

    apply_dist_ckpt_cpu_compat()
    meta = read_checkpoint_meta(ckpt_dir)
    gpt = unwrap_model(model)
    sharded = strip_extra_state(gpt.sharded_state_dict())
    try:
        state = dist_checkpointing.load(sharded, str(Path(ckpt_dir) / MODEL_SUBDIR), strict=StrictHandling.RAISE_ALL)
    except LOAD_ERRORS as exc:  # megatron's CheckpointingException, KeyError, torch's CheckpointException
        raise ValueError(f"{Path(ckpt_dir) / MODEL_SUBDIR}: cannot load into this model ({exc})") from exc
    result = gpt.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{ckpt_dir}: state dict mismatch, missing {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")
    return meta


# ----------------------------------------------------------------------------- HF export
def save_hf_checkpoint(model: Any, hf_cfg: Any, out_dir: str | os.PathLike, *, source_dir: Optional[str] = None,
                       dtype: Optional[torch.dtype | str] = None, max_shard_bytes: int = 5 * 2**30,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       verify_fn: Optional[Callable[[Path], None]] = None) -> Path:
    """Write the live (possibly TP/EP/PP-sharded) model as a Hugging Face directory at ``out_dir``.

    Collective: every rank calls it; rank 0 writes. Output: safetensors shards of at most
    ``max_shard_bytes`` + ``model.safetensors.index.json`` with per-expert names
    (``mlp.experts.{e}.{gate,up,down}_proj.weight``, what SGLang and transformers load), config.json
    and tokenizer/generation files copied from ``source_dir`` (else config.json from ``hf_cfg``).
    ``dtype`` defaults to the config's dtype; ``"fp8"`` / ``fp8.blockwise.BlockFP8Format`` writes
    block-FP8 linear weights with ``weight_scale_inv`` and a ``quantization_config`` (the rest in
    bfloat16, or the model's 16-bit dtype). The directory appears only when complete;
    ``verify_fn(tmp_dir)`` (every rank) may reject it before the rename.
    """
    from megatron_vespo.fp8.blockwise import as_block_fp8

    cfg = read_hf_config(source_dir) if source_dir is not None else hf_config_dict(hf_cfg)
    dims = Qwen3MoeDims.from_hf_config(cfg, source=str(Path(source_dir) / "config.json") if source_dir else "hf_cfg")
    model_dtype = next(unwrap_model(model).parameters()).dtype
    fp8 = as_block_fp8(dtype)  # block FP8 linear weights + quantization_config (fp8/blockwise.py)
    if fp8 is not None:
        dtype = fp8.dtype or (torch.bfloat16 if model_dtype == torch.float32 else model_dtype)
        fp8 = type(fp8)(block=fp8.block, dtype=dtype)
    dtype = parse_dtype(dtype) or config_dtype(cfg) or model_dtype
    dist.check_output_dir(out_dir)
    with dist.dist_atomic_dir(out_dir) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes) if dist.rank() == 0 else None
        for bucket in iter_hf_weights(model, dims, bucket_bytes=bucket_bytes, dtype=fp8 or dtype, dst=0):
            if writer is not None:
                writer.add_all(bucket)
        if writer is not None:
            shards = writer.finalize()
            if source_dir is not None:
                copy_side_files(source_dir, tmp)
            quant_changed = cfg.get("quantization_config") != (fp8.config() if fp8 is not None else None)
            if fp8 is not None:
                cfg["quantization_config"] = fp8.config()
            else:
                cfg.pop("quantization_config", None)  # the weights written are not quantised
            if _normalize_config(cfg, dtype) or source_dir is None or quant_changed:
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
            logger.info("wrote %d HF shard(s), %.1f MB, dtype %s to %s", len(shards), writer.total_bytes / 1e6,
                        dtype_name(dtype), out_dir)
        dist.barrier()
        if verify_fn is not None:
            verify_fn(tmp)
    return Path(out_dir)


def _normalize_config(cfg: dict, dtype: torch.dtype) -> bool:
    """Make ``cfg`` describe the written weights for every loader; True when it changed.

    * the declared dtype must be the dtype of the safetensors we write;
    * transformers 5 saves the expert count as ``num_local_experts`` only, which transformers 4.x
      (hence SGLang / vLLM images pinned to it) ignores, silently defaulting ``num_experts`` to 128.
    """
    changed = False
    if config_dtype(cfg) != dtype:
        for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            cfg[key] = dtype_name(dtype)
        changed = True
    if "num_experts" not in cfg and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]
        changed = True
    return changed


def _megatron_version() -> str:
    try:
        return require("megatron.core", "version").__version__
    except (ImportError, AttributeError):
        return "unknown"
