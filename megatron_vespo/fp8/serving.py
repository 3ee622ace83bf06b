"""Block-FP8 checkpoints and weight updates in the embedded CPU engine, under SGLang's rules.

SGLang decides at start-up whether it serves FP8: an FP8 checkpoint (``quantization_config``
with ``quant_method: fp8``) gets FP8 parameters plus ``weight_scale_inv`` per linear layer, and
every later weight update (from disk, tensor or distributed) is loaded into those same
parameters. So SGLang needs, and the embedded engine enforces:

* an FP8 engine starts from an FP8 checkpoint whose shards are whole blocks at its TP size
  (the embedded engine is TP 1; ``fp8.blockwise.check_block_layout``);
* updates to an FP8 engine carry FP8 linear weights *with* their scales in the same bucket;
  updates to a BF16 engine carry no FP8 tensors. SGLang's Qwen3-MoE ``load_weights`` skips
  names it has no parameter for (``weight_scale_inv`` on a BF16 engine) and casts an FP8
  tensor into a BF16 parameter, silently serving wrong weights; here both are errors.

The embedded engine computes in float32/bfloat16: it stores the dequantised FP8 values
(``q * scale_inv``), which are exactly the weights an FP8 SGLang engine multiplies with;
activations are not quantised here (SGLang quantises them per 1x128 token group on the fly).
transformers' own FP8 loader needs ``accelerate`` and dequantises to bf16 on CPU; this loader
avoids both and keeps the layout checks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from megatron_vespo.fp8.blockwise import (
    SCALE_SUFFIX,
    dequantize_named_tensors,
    is_quantized_linear,
)

logger = logging.getLogger(__name__)

#: attribute set on a model served from a block-FP8 checkpoint: its (block_n, block_k)
FP8_BLOCK_ATTR = "_megatron_vespo_fp8_block"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def checkpoint_fp8_block(config: dict, source: str = "config.json") -> Optional[tuple[int, int]]:
    """``(block_n, block_k)`` of a block-FP8 checkpoint config, None when it is not quantised.

    ValueError names ``source`` for quantisation the embedded engine does not serve (anything but
    SGLang's block FP8 with dynamic activation scaling).
    """
    q = config.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8":
        raise ValueError(f"{source}: quantization_config.quant_method={q.get('quant_method')!r} is not served by the "
                         "embedded engine (only block FP8, quant_method 'fp8')")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2):
        raise ValueError(f"{source}: quantization_config.weight_block_size must be [block_n, block_k] for block FP8 "
                         f"(per-tensor FP8 checkpoints are not served by the embedded engine), got {block!r}")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(f"{source}: quantization_config.activation_scheme={q.get('activation_scheme')!r}: block FP8 "
                         "needs 'dynamic' (SGLang Fp8Config refuses anything else)")
    return int(block[0]), int(block[1])


def served_fp8_block(model: Any) -> Optional[tuple[int, int]]:
    """The block size when ``model`` serves a block-FP8 checkpoint, else None."""
    return getattr(model, FP8_BLOCK_ATTR, None)


def is_fp8_checkpoint(model_path: str | os.PathLike) -> bool:
    """True when ``model_path``'s config.json declares block FP8."""
    path = Path(model_path) / "config.json"
    return path.is_file() and checkpoint_fp8_block(json.loads(path.read_text()), str(path)) is not None


def check_fp8_update(block: Optional[tuple[int, int]], named: Sequence[tuple[str, torch.Tensor]], *,
                     source: str = "weight update", dtype: torch.dtype = torch.float32) -> list:
    """Validate a bucket against the served format and return it with FP8 pairs dequantised to ``dtype``.

    ``block`` is the served model's (``served_fp8_block``; None = a BF16/FP32 engine). ValueError:
    FP8 tensors or scales sent to a non-FP8 engine, high-precision linear weights sent to an FP8
    engine, a scale grid that does not match the engine's block, or an unpaired weight / scale.
    """
    fp8_names = [n for n, t in named if t.dtype in _FP8_DTYPES or n.endswith(SCALE_SUFFIX)]
    if block is None:
        if fp8_names:
            raise ValueError(f"{source}: FP8 tensors ({fp8_names[0]}, ...) sent to an engine serving a non-FP8 "
                             "checkpoint; SGLang would skip the scales and cast FP8 values into BF16 parameters. "
                             "Start the engine from the FP8 export (weight_sync.dtype=fp8 does) or send BF16")
        return list(named)
    plain = [n for n, t in named if is_quantized_linear(n) and t.dtype not in _FP8_DTYPES]
    if plain:
        raise ValueError(f"{source}: {plain[0]} is {dict(named)[plain[0]].dtype} but this engine serves block FP8 "
                         f"(block {list(block)}); send FP8 weights with their weight_scale_inv "
                         "(weight_sync.dtype=fp8)")
    weights = dict(named)
    for n, t in named:
        if n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in weights:
            w = weights[n[: -len(SCALE_SUFFIX)]]
            grid = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
            if tuple(t.shape) != grid or t.dtype != torch.float32:
                raise ValueError(f"{source}: {n} is {t.dtype} {list(t.shape)}; weight {list(w.shape)} with the "
                                 f"engine's block {list(block)} needs float32 {list(grid)}")
    return dequantize_named_tensors(list(named), dtype=dtype, block=block)
