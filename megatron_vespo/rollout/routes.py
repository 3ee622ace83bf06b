"""Codec of MoE routed-expert records (what R3 replays), at the rollout boundary.

Wire format (SGLang, ``return_routed_experts=True``, checked against sglang 0.5.23
``state_capturer/base.py`` + ``managers/detokenizer_manager.py``): ``meta_info["routed_experts"]``
is ``base64(tensor.numpy().tobytes())`` of an int32 C-order array of shape
``[seqlen - 1 - start_len, num_hidden_layers, topk]`` where ``seqlen = prompt + output tokens``
(the last sampled token never went through a forward pass) and ``start_len`` is the request's
``routed_experts_start_len`` (default 0). All ``num_hidden_layers`` are present; rows of dense
layers (Qwen3 ``mlp_only_layers``) are never written and hold 0.

In memory (``Sample.routed_experts``) we keep ``[seqlen - 1, L_moe, K]`` in the smallest dtype
that holds an expert id: uint8 for <= 256 experts (4x fewer bytes than int32), int16 up to 32768
(torch's uint16 lacks most ops), int32 beyond. Any mismatch is a :class:`RouteDecodeError`, never
a silent reshape.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

try:  # SIMD base64 (an SGLang dependency): ~50x faster than the stdlib on 2 KB/token Qwen3-30B routes
    _pybase64 = importlib.import_module("pybase64")
except ImportError:  # pragma: no cover - depends on the environment
    _pybase64 = None


def _b64decode(payload: str) -> bytes:
    """Strict base64 decode (rejects characters outside the alphabet)."""
    if _pybase64 is not None:
        return _pybase64.b64decode(payload, validate=True)
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(payload, strict_mode=True)
    return base64.b64decode(payload, validate=True)


def _b64encode(data: bytes) -> str:
    return (_pybase64.b64encode(data) if _pybase64 is not None else base64.b64encode(data)).decode("utf-8")


class RouteDecodeError(ValueError):
    """A routed-experts payload does not match the tokens or the model it claims to describe."""


def compact_dtype(num_experts: int) -> torch.dtype:
    """Smallest dtype holding expert ids ``0 .. num_experts - 1`` (uint8 / int16 / int32)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 32768:
        return torch.int16
    return torch.int32


@dataclass(frozen=True)
class RouteSpec:
    """Shape of the routes one model produces.

    Attributes:
        num_layers: decoder layers in the wire format (SGLang uses ``num_hidden_layers``).
        topk: experts per token (``num_experts_per_tok``).
        num_experts: routed experts per MoE layer.
        moe_layers: indices of the MoE layers among ``num_layers``; only these are kept.
    """

    num_layers: int
    topk: int
    num_experts: int
    moe_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.topk < 1 or self.num_experts < 1:
            raise ValueError(f"RouteSpec needs positive num_layers/topk/num_experts, got {self}")
        if self.topk > self.num_experts:
            raise ValueError(f"RouteSpec.topk={self.topk} exceeds num_experts={self.num_experts}")
        if not self.moe_layers:
            object.__setattr__(self, "moe_layers", tuple(range(self.num_layers)))
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad or list(self.moe_layers) != sorted(set(self.moe_layers)):
            raise ValueError(f"RouteSpec.moe_layers must be sorted unique indices < {self.num_layers}, "
                             f"got {self.moe_layers}")

    @property
    def dtype(self) -> torch.dtype:
        """Compact in-memory dtype of the expert ids."""
        return compact_dtype(self.num_experts)

    @property
    def wire_ints_per_token(self) -> int:
        """int32 values per token on the wire (all layers)."""
        return self.num_layers * self.topk

    def bytes_per_token(self, compact: bool = True) -> int:
        """Bytes per token: in memory (compact, MoE layers only) or raw int32 on the wire."""
        if compact:
            return len(self.moe_layers) * self.topk * torch.empty((), dtype=self.dtype).element_size()
        return self.wire_ints_per_token * 4

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> "RouteSpec":
        """Build from an HF MoE ``config.json`` (a dict, a file or a checkpoint directory).

        MoE layers follow Qwen3-MoE semantics: layer ``i`` is MoE unless it is in
        ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``.
        """
        source = "config"
        if not isinstance(config, Mapping):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            if not path.is_file():
                raise ValueError(f"{path}: no such config.json for RouteSpec.from_hf_config")
            config = json.loads(path.read_text())
        cfg = dict(config.get("text_config") or config)
        num_experts = cfg.get("num_experts", cfg.get("num_local_experts", cfg.get("n_routed_experts")))
        missing = [k for k, v in (("num_hidden_layers", cfg.get("num_hidden_layers")),
                                  ("num_experts_per_tok", cfg.get("num_experts_per_tok")),
                                  ("num_experts", num_experts)) if v is None]
        if missing:
            raise ValueError(f"{source}: not an MoE config, missing {missing}")
        n = int(cfg["num_hidden_layers"])
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        moe = tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0)
        if not moe:
            raise ValueError(f"{source}: config has no MoE layer (mlp_only_layers/decoder_sparse_step)")
        return cls(num_layers=n, topk=int(cfg["num_experts_per_tok"]), num_experts=int(num_experts),
                   moe_layers=moe)


def encode_routes(routes: torch.Tensor | np.ndarray) -> str:
    """Encode ``[rows, num_layers, topk]`` expert ids exactly as SGLang does (int32 bytes, base64)."""
    arr = routes.cpu().numpy() if isinstance(routes, torch.Tensor) else np.asarray(routes)
    if arr.ndim != 3:
        raise ValueError(f"routes must be [rows, num_layers, topk], got shape {arr.shape}")
    return _b64encode(np.ascontiguousarray(arr, dtype=np.int32).tobytes())


def decode_routes(payload: str, *, num_tokens: int, spec: RouteSpec, start_len: int = 0) -> torch.Tensor:
    """Decode an SGLang ``routed_experts`` string into ``[rows, L_moe, K]`` in the compact dtype.

    Args:
        payload: base64 of int32 ``[rows, spec.num_layers, spec.topk]``.
        num_tokens: prompt + response tokens of the request (``seqlen``).
        spec: the model's route shape.
        start_len: the request's ``routed_experts_start_len``; the payload covers rows
            ``[start_len, num_tokens - 1)``. A server that ignores the field (sglang <= 0.5.9
            accepted but did not apply it) returns all ``num_tokens - 1`` rows: those are sliced.

    Raises:
        RouteDecodeError: bad base64, a byte count that is not whole tokens, a row count that
            does not match the tokens, or an expert id outside ``[0, num_experts)``.
    """
    if not isinstance(payload, str):
        raise RouteDecodeError(f"routed_experts must be a base64 string, got {type(payload).__name__}")
    full_rows = num_tokens - 1
    if full_rows < 0 or not 0 <= start_len <= max(full_rows, 0):
        raise RouteDecodeError(f"bad route window: num_tokens={num_tokens}, start_len={start_len}")
    try:
        raw = _b64decode(payload)
    except (binascii.Error, ValueError) as exc:
        raise RouteDecodeError(f"routed_experts is not valid base64 ({exc})") from None
    per_token = spec.wire_ints_per_token * 4
    if len(raw) % per_token:
        raise RouteDecodeError(f"routed_experts has {len(raw)} bytes, not a multiple of {per_token} "
                               f"(= num_layers {spec.num_layers} x topk {spec.topk} x 4 bytes): wrong model "
                               "config or corrupted payload")
    rows = len(raw) // per_token
    arr = np.frombuffer(raw, dtype=np.int32).reshape(rows, spec.num_layers, spec.topk)
    expected = full_rows - start_len
    if rows == full_rows and start_len > 0:
        arr = arr[start_len:]
    elif rows != expected:
        raise RouteDecodeError(f"routed_experts has {rows} token rows, expected {expected} "
                               f"(= {num_tokens} tokens - 1 - start_len {start_len}); routes do not "
                               "belong to these tokens (retracted / re-prefilled request?)")
    if len(spec.moe_layers) != spec.num_layers:
        arr = arr[:, list(spec.moe_layers)]
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= spec.num_experts:
            raise RouteDecodeError(f"routed_experts holds expert id {lo if lo < 0 else hi}, outside "
                                   f"[0, {spec.num_experts}) of this model")
    return torch.from_numpy(np.ascontiguousarray(arr).astype(_NP_DTYPES[spec.dtype]))


_NP_DTYPES = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32}


def stitch_routes(prefix: torch.Tensor, tail: torch.Tensor, start_len: int) -> torch.Tensor:
    """Join known routes of the first ``start_len`` rows with a continued request's tail rows.

    ``prefix`` must hold at least ``start_len`` rows (e.g. the previous turn's routes); rows
    beyond ``start_len`` are replaced by ``tail`` (the engine recomputed them).
    """
    if prefix.shape[0] < start_len:
        raise RouteDecodeError(f"prefix routes have {prefix.shape[0]} rows, fewer than start_len={start_len}")
    if prefix.shape[1:] != tail.shape[1:]:
        raise RouteDecodeError(f"prefix routes {tuple(prefix.shape)} and tail {tuple(tail.shape)} differ "
                               "in layers/topk")
    return torch.cat([prefix[:start_len].to(tail.dtype), tail], dim=0)


def routes_equal(a: Optional[torch.Tensor], b: Optional[torch.Tensor], sort_topk: bool = True) -> bool:
    """Whether two route tensors name the same experts (order within top-k ignored by default)."""
    if a is None or b is None:
        return a is b
    if a.shape != b.shape:
        return False
    a, b = a.long(), b.long()
    if sort_topk:
        a, b = a.sort(dim=-1).values, b.sort(dim=-1).values
    return bool(torch.equal(a, b))


def select_moe_layers(routes: torch.Tensor, moe_layers: Sequence[int]) -> torch.Tensor:
    """Keep the MoE layers of a ``[rows, num_layers, topk]`` tensor."""
    return routes[:, list(moe_layers)]
