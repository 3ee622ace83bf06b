"""The weight-bucket wire format both ends speak: the trainer (``weight_sync/``) and the engine
(``rollout/embedded/``, the CPU stand-in for SGLang).

This module sits below both so neither imports the other (``tests/test_layering.py``); it
imports torch alone.

* dtype names: a tensor's dtype travels as the attribute name of ``torch`` (``"bfloat16"``),
  as SGLang's ``update_weights_from_distributed`` reads it with ``getattr(torch, name)``
  (sglang 0.5.23 ``model_runner_components/weight_updater.py``): :func:`dtype_name`,
  :func:`parse_dtype`.
* flattened buckets (``load_format="flattened_bucket"``, sglang
  ``weight_sync/tensor_bucket.py``): the bucket's tensors as one 1-D uint8 tensor, each entry
  ``(name, dtype, shape, start, end)`` in bytes, and the engine rebuilds
  ``flat[start:end].view(dtype).reshape(shape)``. Over a broadcast only names, dtypes and
  shapes travel and the offsets are the packed ones. :func:`aligned_order` keeps every offset a
  multiple of its element size; :func:`flattened_bucket` packs, :func:`reconstruct_flattened`
  unpacks and checks.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Sequence

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (what SGLang's ``getattr(torch, name)`` expects)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` (or ``"torch.bfloat16"``) -> ``torch.bfloat16``; ValueError for anything else."""
    attr = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(attr, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (expected a torch dtype name such as 'bfloat16')")
    return attr


def _metadata_class() -> Callable[..., Any]:
    """SGLang's ``FlattenedTensorMetadata`` when sglang imports (its allowlist unpickler accepts
    it), else ``types.SimpleNamespace`` (also on the allowlist)."""
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except Exception:  # noqa: BLE001 - sglang absent or not importable here (e.g. no CUDA build)
        return types.SimpleNamespace
    return FlattenedTensorMetadata


def aligned_order(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors by decreasing element size (stable), so that packed byte offsets stay aligned.

    SGLang views each slice of the flat uint8 tensor as its dtype, which needs the offset to be a
    multiple of the element size (its receiver rejects unaligned buckets): an fp32 tensor after an
    odd number of bf16 elements would break that.
    """
    return sorted(named_tensors, key=lambda nt: -nt[1].element_size())


def flattened_bucket(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """``{"flattened_tensor", "metadata"}`` of SGLang's flattened bucket (uint8, byte offsets, any dtypes,
    in :func:`aligned_order`)."""
    if not named_tensors:
        raise ValueError("cannot build a flattened bucket from no tensors")
    meta_cls, metadata, parts, offset = _metadata_class(), [], [], 0
    for name, t in aligned_order(named_tensors):
        flat = t.detach().contiguous().view(-1).view(torch.uint8)
        metadata.append(meta_cls(name=name, shape=t.shape, dtype=t.dtype, start_idx=offset,
                                 end_idx=offset + flat.numel(), numel=flat.numel()))
        parts.append(flat)
        offset += flat.numel()
    return {"flattened_tensor": torch.cat(parts), "metadata": metadata}


def reconstruct_flattened(flat: torch.Tensor, meta: Sequence[tuple]) -> list[tuple[str, torch.Tensor]]:
    """Views of ``flat`` (uint8) per ``(name, dtype, shape[, start, end])``; offsets default to packed.

    Raises ValueError when an entry falls outside ``flat``, is misaligned or its size does not
    match its shape (SGLang would read garbage or crash).
    """
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"flattened tensor must be 1-D uint8, got {flat.dtype} {list(flat.shape)}")
    out, offset = [], 0
    for entry in meta:
        name, dtype, shape = entry[0], entry[1], torch.Size(entry[2])
        start, end = (entry[3], entry[4]) if len(entry) > 3 else (offset, offset + shape.numel() * dtype.itemsize)
        if not 0 <= start <= end <= flat.numel() or end - start != shape.numel() * dtype.itemsize:
            raise ValueError(f"{name}: bytes [{start}, {end}) do not hold {list(shape)} {dtype} inside a flat "
                             f"tensor of {flat.numel()} bytes")
        if start % dtype.itemsize:
            raise ValueError(f"{name}: byte offset {start} is not aligned to {dtype}")
        out.append((name, flat[start:end].view(dtype).reshape(shape)))
        offset = end
    return out
