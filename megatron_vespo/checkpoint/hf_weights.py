"""Live Megatron model <-> Hugging Face tensors: import HF weights into a (sharded) ``GPTModel`` and
export it as HF-named full tensors, in byte-size buckets.

Used by ``convert hf-to-mcore`` / ``mcore-to-hf``, by ``save_hf_checkpoint`` and by weight sync
to the rollout engine. All name/layout knowledge comes from :mod:`megatron_vespo.checkpoint.mapping`.

Export is collective: every rank of the job calls :func:`iter_hf_weights` and iterates it to the
end (the buckets are produced in lockstep). Shards are reassembled with all-gathers over the
TP group (non-expert tensors), the expert-TP group and the EP group (experts: per MoE layer and
fc, every EP rank's local experts stacked into one all-gather), then broadcast over the pipeline
group from the stage that owns the layer. Importing is local: each rank reads only the HF tensors of its own shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from megatron_vespo.checkpoint.mapping import (
    ParamRule,
    Qwen3MoeDims,
    build_rules,
    canonical_name,
    hf_to_mcore,
    mcore_to_hf,
    mcore_to_hf_views,
    tp_shard,
    tp_unshard,
)
from megatron_vespo.models.dims import as_dims  # noqa: F401  (re-exported: callers import it from here)

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 * 2**20


def unwrap_model(model: Any) -> Any:
    """The ``GPTModel`` inside DDP / Float16Module wrappers (or a 1-element list of chunks)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"virtual pipeline chunks are not supported by the HF mapping (got {len(model)})")
        model = model[0]
    while hasattr(model, "module"):
        model = model.module
    return model


@dataclass
class ShardLayout:
    """Where this rank's parameters sit in the global model (read from parallel_state)."""

    tp_rank: int = 0
    tp_size: int = 1
    etp_rank: int = 0
    etp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    groups: dict = field(default_factory=dict)

    @classmethod
    def current(cls) -> "ShardLayout":
        """The layout of the initialised Megatron parallel_state (1-process defaults otherwise)."""
        if not torch.distributed.is_initialized():
            return cls()
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return cls()
        return cls(
            tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
            etp_rank=ps.get_expert_tensor_parallel_rank(), etp_size=ps.get_expert_tensor_parallel_world_size(),
            ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ps.get_expert_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
            groups={"tp": ps.get_tensor_model_parallel_group(), "etp": ps.get_expert_tensor_parallel_group(),
                    "ep": ps.get_expert_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group()},
        )


@dataclass
class LocalParam:
    """One parameter of this rank with its rule and the TP coordinates it is split over."""

    local_name: str
    param: torch.nn.Parameter
    rule: ParamRule
    tp_rank: int
    tp_size: int


def local_params(model: Any, dims: Any, layout: Optional[ShardLayout] = None) -> list[LocalParam]:
    """Match every parameter of this rank's model shard with its mapping rule.

    Raises ValueError naming the parameter when it has no HF counterpart (unsupported spec).
    """
    dims = as_dims(dims)
    layout = layout or ShardLayout.current()
    gpt = unwrap_model(model)
    layer_global = {k: int(layer.layer_number) - 1 for k, layer in enumerate(gpt.decoder.layers)} \
        if getattr(gpt, "decoder", None) is not None else {}
    if dims.num_experts % layout.ep_size:
        raise ValueError(f"expert_model_parallel_size={layout.ep_size} does not divide num_experts={dims.num_experts}")
    n_local = dims.num_experts // layout.ep_size
    rules = {r.mcore: r for r in build_rules(dims)}
    out = []
    for name, param in gpt.named_parameters():
        canon = canonical_name(name, expert_offset=layout.ep_rank * n_local)
        parts = canon.split(".")
        if canon.startswith("decoder.layers."):
            parts[2] = str(layer_global[int(parts[2])])
            canon = ".".join(parts)
        if canon == "output_layer.weight" and dims.tie_word_embeddings:
            canon = "embedding.word_embeddings.weight"  # last-stage copy of the tied embedding
        if canon not in rules:
            raise ValueError(f"model parameter '{name}' (global '{canon}') has no Hugging Face counterpart in the "
                             "Qwen3-MoE mapping; does the model config match config.json?")
        rule = rules[canon]
        expert = rule.expert is not None
        out.append(LocalParam(name, param, rule, layout.etp_rank if expert else layout.tp_rank,
                              layout.etp_size if expert else layout.tp_size))
    return out


def _all_gather_object(obj: Any, group: Any = None) -> list:
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


# ----------------------------------------------------------------------------- import
@torch.no_grad()
def load_hf_weights(model: Any, reader: Any, dims: Any, layout: Optional[ShardLayout] = None) -> int:
    """Copy HF tensors (from an ``HFCheckpointReader`` or a ``{name: tensor}`` dict) into this rank's shards.

    Collective when torch.distributed is initialised (a final check that the ranks together
    covered every rule). Returns the number of parameters filled on this rank.
    """
    dims = as_dims(dims)
    layout = layout or ShardLayout.current()
    get = reader.get if hasattr(reader, "get") and not isinstance(reader, dict) else reader.__getitem__
    params = local_params(model, dims, layout)
    for lp in params:
        full = hf_to_mcore(lp.rule, [get(n) for n in lp.rule.hf], dims)
        padded = lp.param.shape[0] * lp.tp_size if lp.rule.vocab else None
        shard = tp_shard(lp.rule, full, lp.tp_rank, lp.tp_size, padded_vocab=padded)
        if tuple(shard.shape) != tuple(lp.param.shape):
            raise ValueError(f"{lp.local_name}: HF tensors {list(lp.rule.hf)} give a shard of shape "
                             f"{list(shard.shape)}, the model expects {list(lp.param.shape)}")
        lp.param.data.copy_(shard.to(lp.param.dtype))
    covered = set().union(*_all_gather_object({lp.rule.mcore for lp in params}))
    missing = sorted({r.mcore for r in build_rules(dims)} - covered)
    if missing:
        raise ValueError(f"no rank holds {len(missing)} model tensors, e.g. {missing[:3]}: the model does not "
                         "match config.json")
    return len(params)


# ----------------------------------------------------------------------------- export
def _full_shape(rule: ParamRule, dims: Qwen3MoeDims) -> tuple:
    shapes = rule.hf_shapes(dims)
    if rule.kind == "copy":
        return shapes[0]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _gather_tp(lp: LocalParam, layout: ShardLayout, vocab_size: int) -> torch.Tensor:
    from megatron_vespo.fp8.te import to_high_precision

    t = to_high_precision(lp.param.detach())  # FP8 parameters (fp8.fp8_param_gather) -> their bf16 values
    if lp.rule.tp_dim is None or lp.tp_size == 1:
        return tp_unshard(lp.rule, [t], vocab_size)
    group = layout.groups["etp" if lp.rule.expert is not None else "tp"]
    shards = [torch.empty_like(t) for _ in range(lp.tp_size)]
    torch.distributed.all_gather(shards, t.contiguous(), group=group)
    return tp_unshard(lp.rule, shards, vocab_size)


def _plan(dims: Qwen3MoeDims, layout: ShardLayout) -> list[list[ParamRule]]:
    """Export units in a fixed order: one per non-expert rule; per MoE layer, one per fc holding
    every expert's rule (EP rank e's local experts at ``[e * n_local, (e + 1) * n_local)``), which one
    all-gather over the EP group yields (was one all-gather per local expert: 1,536 per sync for
    Qwen3-30B-A3B at EP8 instead of 96)."""
    n_local = dims.num_experts // layout.ep_size
    units: list[Any] = []
    experts: dict[str, dict] = {}
    for r in build_rules(dims):
        if r.expert is None:
            units.append([r])
            continue
        layer = r.mcore.split(".")[2]
        if layer not in experts:
            experts[layer] = {}
            units.append(layer)  # placeholder, expanded below once all experts are known
        experts[layer][(r.expert, r.mcore.rsplit(".", 2)[-2])] = r
    out: list[list[ParamRule]] = []
    for u in units:
        if isinstance(u, str):
            out.extend([experts[u][(e * n_local + j, fc)] for e in range(layout.ep_size) for j in range(n_local)]
                       for fc in ("linear_fc1", "linear_fc2"))
        else:
            out.append(u)
    return out


def _pp_owner(local: dict, layout: ShardLayout) -> dict[str, int]:
    """Global rank (in this rank's pipeline group) of the stage holding each rule."""
    if layout.pp_size == 1:
        return {}
    ranks = torch.distributed.get_process_group_ranks(layout.groups["pp"])
    owned = _all_gather_object(sorted(local), layout.groups["pp"])
    return {name: ranks[stage] for stage, names in enumerate(owned) for name in names}


def iter_hf_weights(model: Any, dims: Any, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    dtype: Optional[torch.dtype | str] = None, dst: Optional[int] = None,
                    layout: Optional[ShardLayout] = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the full model as HF ``(name, tensor)`` pairs in buckets of at most ``bucket_bytes``
    (a single larger tensor gets a bucket of its own).

    Every rank must call this and exhaust the iterator (collectives run in lockstep). With
    ``dst=None`` every rank receives every full tensor; with ``dst=r`` only global rank ``r`` gets
    tensors and the other ranks get empty buckets at the same points. ``dtype`` casts on export
    (e.g. bfloat16 for the rollout engine); ``dtype="fp8"`` (or a ``fp8.blockwise.BlockFP8Format``)
    exports linear weights as block FP8 with their ``weight_scale_inv`` in the same bucket and
    the rest in bfloat16 (the model's dtype unless fp32); vocab padding is stripped. Every HF tensor of the
    model is yielded exactly once. ``dims``: ``Qwen3MoeDims`` or the HF config (dict / object).
    """
    from megatron_vespo.fp8.blockwise import as_block_fp8

    dims = as_dims(dims)
    fp8 = as_block_fp8(dtype)  # block FP8 for an FP8 rollout engine (fp8/blockwise.py)
    if fp8 is not None:
        dtype = None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    layout = layout or ShardLayout.current()
    local = {lp.rule.mcore: lp for lp in local_params(model, dims, layout)}
    owner = _pp_owner(local, layout)
    keep = dst is None or not torch.distributed.is_initialized() or torch.distributed.get_rank() == dst
    model_dtype = next(iter(local.values())).param.dtype
    device = next(iter(local.values())).param.device
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for unit in _plan(dims, layout):
        head = unit[0]
        if head.expert is None:
            fulls = [_gather_tp(local[head.mcore], layout, dims.vocab_size)] if head.mcore in local else None
        elif unit[layout.ep_rank * (len(unit) // layout.ep_size)].mcore in local or layout.pp_size == 1:
            # every EP rank of the stage owning this layer joins the all-gather with its local experts
            # of the unit stacked (testing unit[0] left EP ranks > 0 out of it under PP)
            n_local = len(unit) // layout.ep_size
            mine = [_gather_tp(local[r.mcore], layout, dims.vocab_size)
                    for r in unit[layout.ep_rank * n_local:(layout.ep_rank + 1) * n_local]]
            if layout.ep_size > 1:  # stacked for one all-gather (with EP 1 the stack was only a copy)
                stacked = torch.stack(mine)
                parts = [torch.empty_like(stacked) for _ in range(layout.ep_size)]
                torch.distributed.all_gather(parts, stacked, group=layout.groups["ep"])
                mine = list(torch.cat(parts).unbind(0))
            fulls = mine
        else:
            fulls = None
        if layout.pp_size > 1:
            src = owner[unit[layout.ep_rank * (len(unit) // layout.ep_size) if head.expert is not None else 0].mcore]
            if fulls is None:
                fulls = [torch.empty(_full_shape(r, dims), dtype=model_dtype, device=device) for r in unit]
            stacked = torch.stack(fulls)
            torch.distributed.broadcast(stacked, src=src, group=layout.groups["pp"])
            fulls = list(stacked.unbind(0))
        for rule, full in zip(unit, fulls):
            pairs = mcore_to_hf(rule, full, dims)
            if fp8 is not None:  # an FP8 weight and its scale stay in one bucket
                groups = fp8.groups(pairs, torch.bfloat16 if model_dtype == torch.float32 else model_dtype)
            else:
                groups = [(t.numel() * t.element_size(), [(n, t)]) for n, t in
                          ((n, t if dtype is None else t.to(dtype)) for n, t in pairs)]
            for nbytes, group in groups:
                if size and size + nbytes > bucket_bytes:  # same sizes on every rank: lockstep
                    yield bucket
                    bucket, size = [], 0
                size += nbytes
                if keep:
                    bucket.extend(group)
    if size:
        yield bucket


def hf_source_views(model: Any, dims: Any, layout: Optional[ShardLayout] = None
                    ) -> Optional[list[tuple[str, torch.Tensor, torch.nn.Parameter]]]:
    """Every HF tensor of an unsharded model as a view of its parameter: ``[(hf_name, view, param)]``.

    For readers that copy the current weights again and again (the CPU weight staging): no
    gathers, no copies, no Python per tensor after the first call. The views are those of
    :func:`iter_hf_weights` without its ``contiguous()`` copies (q/k/v keep
    ``mapping.mcore_to_hf_views``' shape). None when the model is sharded (TP, EP or PP > 1) or
    holds FP8 parameters: those go through :func:`iter_hf_weights`.
    """
    from megatron_vespo.fp8.te import is_fp8_tensor

    dims = as_dims(dims)
    layout = layout or ShardLayout.current()
    if (layout.tp_size, layout.etp_size, layout.ep_size, layout.pp_size) != (1, 1, 1, 1):
        return None
    out = []
    for lp in local_params(model, dims, layout):
        if is_fp8_tensor(lp.param):
            return None
        full = tp_unshard(lp.rule, [lp.param.detach()], dims.vocab_size)
        out.extend((name, view, lp.param) for name, view in mcore_to_hf_views(lp.rule, full, dims))
    return out


def export_hf_state_dict(model: Any, dims: Any, dtype: Optional[torch.dtype] = None) -> dict:
    """The whole model as one ``{hf_name: tensor}`` dict on every rank (tests, small models)."""
    out: dict[str, torch.Tensor] = {}
    for bucket in iter_hf_weights(model, dims, dtype=dtype):
        for name, t in bucket:
            if name in out:
                raise RuntimeError(f"export produced '{name}' twice")
            out[name] = t
    return out
