"""FP8 in the embedded engine: serving a block-FP8 export, and rounding served weights to FP8.

The FP8 *format* (quantise / dequantise, SGLang's block-layout rules, the update checks) lives in
``megatron_vespo/fp8/``; this module is the engine's use of it, on the rollout side of the
package layering:

* :func:`load_fp8_hf_model`: build the transformers model of a block-FP8 HF directory with its
  weights dequantised (what an FP8 SGLang engine multiplies with), checking the block layout at
  the engine's TP size of 1 and the whole checkpoint (``weight_checks``) first;
* :func:`emulate_weights_`: round a BF16/FP32 model's linear weights to FP8 in place
  (``fp8.emulate.fake_quant``), for FP8-vs-BF16 mismatch studies.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from megatron_vespo.fp8.blockwise import check_block_layout, is_quantized_linear
from megatron_vespo.fp8.emulate import EMULATED_RECIPES, fake_quant
from megatron_vespo.fp8.serving import FP8_BLOCK_ATTR, check_fp8_update, checkpoint_fp8_block
from megatron_vespo.rollout.embedded.weight_checks import read_checkpoint_tensors, validate_full_checkpoint
from megatron_vespo.rollout.embedded.weight_update import hf_param_views, load_named_tensors
from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)


def load_fp8_hf_model(model_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Any:
    """A transformers model built from a block-FP8 HF directory, weights dequantised to ``dtype``.

    Checks the block layout at TP 1 (what SGLang checks at start-up) and that every linear weight
    is FP8 with its scale and nothing is missing or unexpected. The model remembers its block size
    (``fp8.serving.served_fp8_block``), so later updates must keep the format.
    """
    transformers = require("transformers", "the embedded rollout engine")
    path = Path(model_path)
    source = str(path / "config.json")
    cfg = json.loads((path / "config.json").read_text())
    block = checkpoint_fp8_block(cfg, source)
    if block is None:
        raise ValueError(f"{source}: not a block-FP8 checkpoint (no quantization_config)")
    check_block_layout(cfg, block, tp_size=1, field=f"{source} quantization_config.weight_block_size={list(block)}")
    hf_cfg = transformers.AutoConfig.from_pretrained(str(path))
    if hasattr(hf_cfg, "quantization_config"):
        del hf_cfg.quantization_config  # build a plain model: weights are dequantised below
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(dtype)
    named = check_fp8_update(block, read_checkpoint_tensors(path), source=str(path), dtype=dtype)
    views = hf_param_views(model)
    try:
        validate_full_checkpoint(model, views, named)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    load_named_tensors(model, named, views)
    setattr(model, FP8_BLOCK_ATTR, block)
    logger.info("loaded block-FP8 checkpoint %s (block %s), dequantised to %s", path, list(block), dtype)
    return model.eval()


@torch.no_grad()
def emulate_weights_(model: torch.nn.Module, recipe: str = "blockwise", block: tuple[int, int] = (128, 128),
                     power2: bool = False) -> int:
    """Round an HF model's linear weights (``fp8.blockwise.is_quantized_linear`` names) to FP8 in place.

    For the embedded engine: ``blockwise`` with FP32 scales is what an FP8 SGLang engine serving a
    block-FP8 checkpoint multiplies with; ``tensorwise`` / ``mxfp8`` follow ``fp8.emulate``'s recipe
    table. Returns the number of tensors rounded.
    """
    if recipe not in EMULATED_RECIPES:
        raise ValueError(f"FP8 weight emulation recipe must be one of {list(EMULATED_RECIPES)}, got {recipe!r}")
    blk = None if recipe == "tensorwise" else ((1, 32) if recipe == "mxfp8" else tuple(block))
    n = 0
    for name, view in hf_param_views(model).items():
        if is_quantized_linear(name):
            view.copy_(fake_quant(view, "e4m3", blk, power2 or recipe == "mxfp8"))
            n += 1
    return n
