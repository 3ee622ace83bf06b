"""The tensor index (names and shapes) of a Hugging Face Qwen3-MoE checkpoint, from its config alone.

Derivation, independent of our own HF <-> Megatron mapping (``checkpoint/mapping.py``), so that
comparing the two is a real check: instantiate ``transformers.Qwen3MoeForCausalLM`` from the
config on the ``meta`` device (no memory, a fraction of a second at 30B) and list its parameters.
transformers >= 5 keeps the experts of a layer fused (``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I]) and converts them when it reads a checkpoint, whose files
hold one tensor per expert and projection (``mlp.experts.{e}.{gate,up,down}_proj.weight``,
what ``model.safetensors.index.json`` of Qwen/Qwen3-30B-A3B lists); the fused parameters are
expanded back to those names here. transformers 4.x already has per-expert modules.

The same function wrote ``tests/plan/data/qwen3_30b_a3b_tensor_index.json.gz`` from the
published ``config.json`` (see docs/planning.md, "Test data").
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any

from megatron_vespo.utils.imports import require


def hf_model_param_count(hf_cfg: Any) -> int:
    """Exact parameter count of ``Qwen3MoeForCausalLM(hf_cfg)`` (built on the meta device)."""
    model = _meta_hf_model(hf_cfg)
    return sum(p.numel() for p in model.parameters())


def _meta_hf_model(hf_cfg: Any) -> Any:
    torch = require("torch", "the HF model on the meta device")
    transformers = require("transformers", "the HF model on the meta device")
    with torch.device("meta"):
        return transformers.Qwen3MoeForCausalLM(hf_cfg)


def hf_checkpoint_index(hf_cfg: Any) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of a safetensors checkpoint of ``Qwen3MoeForCausalLM(hf_cfg)``."""
    model = _meta_hf_model(hf_cfg)
    out: dict[str, tuple[int, ...]] = {}
    for name, p in model.named_parameters():
        shape = tuple(int(s) for s in p.shape)
        if name.endswith("mlp.experts.gate_up_proj") and len(shape) == 3:
            prefix, (n_exp, two_i, hidden) = name[: -len("gate_up_proj")], shape
            for e in range(n_exp):
                out[f"{prefix}{e}.gate_proj.weight"] = (two_i // 2, hidden)
                out[f"{prefix}{e}.up_proj.weight"] = (two_i // 2, hidden)
        elif name.endswith("mlp.experts.down_proj") and len(shape) == 3:
            prefix, (n_exp, hidden, inter) = name[: -len("down_proj")], shape
            for e in range(n_exp):
                out[f"{prefix}{e}.down_proj.weight"] = (hidden, inter)
        else:
            out[name] = shape
    if getattr(hf_cfg, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # tied: the checkpoint stores the embedding once
    return out


def write_index(index: dict[str, tuple[int, ...]], path: str | os.PathLike) -> None:
    """Write ``{name: shape}`` as gzip JSON (sorted names, shapes as lists), atomically."""
    from megatron_vespo.utils.io import atomic_path

    data = json.dumps({k: list(v) for k, v in sorted(index.items())}, separators=(",", ":")).encode()
    with atomic_path(path, "wb") as fh:
        fh.write(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def read_index(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Read an index written by :func:`write_index` (``.json`` or ``.json.gz``)."""
    raw = open(path, "rb").read()
    if str(path).endswith(".gz"):
        raw = gzip.decompress(raw)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON tensor index ({exc})") from exc
    return {k: tuple(v) for k, v in data.items()}
