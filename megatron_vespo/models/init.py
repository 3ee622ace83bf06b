"""Layout-invariant random initialisation of a Megatron model shard.

Megatron draws each rank's weights from RNG streams that depend on the TP/EP rank, so a
TP=2 or EP=2 model does not start from the same weights as the 1-process model. For
parity tests, benchmarks and CPU runs without a checkpoint we want *one* global model,
whatever the layout: every parameter is drawn from a generator seeded by its *global*
name (layer index with the pipeline offset, expert index with the EP offset), then this
rank keeps its tensor-parallel slice, using the slicing Megatron itself uses
(``tensor_model_parallel``, ``partition_dim``, ``partition_stride`` attributes, as in
``tensor_parallel/layers.py:_initialize_affine_weight_cpu``: the global tensor is cut into
``size * stride`` chunks along ``partition_dim`` and rank r keeps chunks r, r+size, ...).

Loading real weights is ``checkpoint/``'s job; this only makes random models comparable.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import torch

_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")
_LOCAL_EXPERT = re.compile(r"(local_experts\.)(\d+)(\.)")
_GROUPED_EXPERT = re.compile(r"(experts\.linear_fc[12]\.weight)(\d+)$")


def global_param_name(name: str, *, layer_offset: int = 0, ep_rank: int = 0, num_local_experts: int = 0) -> str:
    """Map a local Megatron parameter name to its name in the 1-process model.

    ``decoder.layers.{i}`` gets the pipeline-stage ``layer_offset``; expert indices
    (``local_experts.{j}`` in the local spec, ``linear_fc1.weight{j}`` in TE's grouped MLP)
    get ``ep_rank * num_local_experts``.
    """
    if layer_offset:
        name = _LAYER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}", name, count=1)
    if num_local_experts and ep_rank:
        off = ep_rank * num_local_experts
        name = _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + off}{m.group(3)}", name, count=1)
        name = _GROUPED_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + off}", name, count=1)
    return name


def shard_global_tensor(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of ``full``, cut the way Megatron's strided TP partitioning cuts it."""
    if size == 1:
        return full
    chunk = full.shape[dim] // (size * stride)
    pieces = torch.split(full, chunk, dim=dim)
    return torch.cat(pieces[rank::size], dim=dim)


def _is_norm(name: str) -> bool:
    return name.endswith("layernorm.weight") or name.endswith("layer_norm_weight") or "norm." in name


def _seed_for(seed: int, gname: str) -> int:
    return zlib.crc32(f"{seed}:{gname}".encode()) & 0x7FFFFFFF


@torch.no_grad()
def init_layout_invariant_(model: torch.nn.Module, seed: int = 0, std: float = 0.02,
                           norm_noise: float = 0.1) -> None:
    """Overwrite every parameter of this rank's shard with its slice of one global random model.

    Linear/embedding weights ~ N(0, std^2); norm weights ~ 1 + N(0, norm_noise^2) (not all
    ones, so wrong norm-gradient reductions show up in parity tests). Call before wrapping
    in Megatron DDP. Parallel state must be initialised.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = model.config
    offset = get_transformer_layer_offset(config, vp_stage=getattr(model, "vp_stage", None))
    ep_rank = ps.get_expert_model_parallel_rank()
    n_local = (config.num_moe_experts or 0) // max(ps.get_expert_model_parallel_world_size(), 1)
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    for name, param in model.named_parameters():
        gname = global_param_name(name, layer_offset=offset, ep_rank=ep_rank, num_local_experts=n_local)
        rank, size = etp if ".experts." in name else tp
        shape = list(param.shape)
        parallel = bool(getattr(param, "tensor_model_parallel", False))
        dim, stride = int(getattr(param, "partition_dim", -1)), int(getattr(param, "partition_stride", 1))
        if parallel and size > 1:
            shape[dim] *= size
        gen = torch.Generator().manual_seed(_seed_for(seed, gname))
        full = torch.randn(shape, generator=gen, dtype=torch.float32)
        full = 1.0 + norm_noise * full if _is_norm(name) else std * full
        local = shard_global_tensor(full, dim, stride, rank, size) if parallel and size > 1 else full
        param.copy_(local.to(param.dtype))


def describe_parameters(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Name, local shape and TP split attributes of every parameter (for docs and converters)."""
    return [{"name": n, "shape": tuple(p.shape),
             "tensor_model_parallel": bool(getattr(p, "tensor_model_parallel", False)),
             "partition_dim": int(getattr(p, "partition_dim", -1)),
             "partition_stride": int(getattr(p, "partition_stride", 1))}
            for n, p in model.named_parameters()]
