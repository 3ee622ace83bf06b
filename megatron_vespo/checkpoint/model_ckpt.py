"""Megatron model checkpoint directories (dist_checkpointing, torch_dist backend).

A *model checkpoint directory* (what ``convert hf-to-mcore`` writes, and what every training
``iter_XXXXXXX`` directory contains)::

    megatron_vespo_checkpoint.json   format version, params dtype, layout it was saved under
    model/                           dist_checkpointing torch_dist files (layout-independent:
                                     loads under any TP/EP/PP layout)
    hf/                              config.json + tokenizer / generation files, passed through

Hugging Face directories (reading them, and writing one from a live model) are in ``hf_dir``;
the live model's HF-named tensors in ``hf_weights``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

from torch.distributed.checkpoint.api import CheckpointException

from megatron_vespo.checkpoint import dist
from megatron_vespo.checkpoint.hf_dir import (
    copy_side_files,
    dtype_name,
    hf_config_dict,
    read_hf_config,
)
from megatron_vespo.checkpoint.hf_weights import ShardLayout, unwrap_model
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

    from megatron_vespo.compat.dist_ckpt import apply_dist_ckpt_cpu_compat

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

    from megatron_vespo.compat.dist_ckpt import apply_dist_ckpt_cpu_compat

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


def _megatron_version() -> str:
    try:
        return require("megatron.core", "version").__version__
    except (ImportError, AttributeError):
        return "unknown"
