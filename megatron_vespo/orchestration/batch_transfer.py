"""Rank 0's rollout batch to every training rank: tensors, not pickles; routes compact and DP-sharded.

Rank 0 collects the rollout; every rank trains on it. What each rank receives:

1. a small pickled header (``broadcast_object_list``): field names, shapes and dtypes, the
   data-set position, an error if rank 0 failed -- a few KB, never a tensor;
2. the per-row and per-token fields (tokens, loss mask, lengths, advantages, rollout
   log-probs, group ids, versions) in full, as one byte buffer broadcast from rank 0: the actor
   computes mini-batch denominators, old-log-prob masks and metrics over whole rows of the
   rollout batch (16 B per token);
3. ``routed_experts`` in their compact type (``routing/compact.py``: uint8 for < 255 experts)
   and only the rows of this rank's data-parallel shard (the rows ``train/batching.py`` gives
   it in each mini-batch): scattered from rank 0 over the DP group of the model-parallel
   leaders, then broadcast inside each DP replica (its TP and PP ranks share one shard).
   Sent in chunks of ``chunk_bytes`` so the NCCL staging buffer stays small.

Before (``broadcast_object_list`` of the whole ``TrainBatch``, int64 routes): the pickled batch
went to every rank as one GPU byte tensor, 14.5 GB for ``qwen3_30b_a3b_vespo_ep8.yaml`` with
R3. Bytes per rank for the shipped configs are in docs/megatron.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from megatron_vespo.routing.compact import RouteRows, encode_routes
from megatron_vespo.types import TrainBatch

if TYPE_CHECKING:
    from megatron_vespo.train.interfaces import Actor

logger = logging.getLogger(__name__)

#: what the last ``broadcast_batch`` moved to this rank (bytes by kind), for logs and tests
last_stats: dict[str, int] = {}


@dataclass(frozen=True)
class BatchLayout:
    """Which rows this rank needs and the process groups that deliver them.

    Attributes:
        dp_rank / dp_size: this rank's data-parallel coordinates.
        mini_batch_size: rows per optimizer update (a DP rank trains on its slice of each).
        dp_group: this rank's DP group (for the replica leaders it must contain rank 0); None
            for the default group.
        replica_group: ranks holding the same DP shard (TP x PP of one replica), its group
            rank 0 the leader; None when this rank is its replica's only rank.
    """

    dp_rank: int = 0
    dp_size: int = 1
    mini_batch_size: int = 0
    dp_group: Any = None
    replica_group: Any = None

    @classmethod
    def from_actor(cls, actor: Actor) -> "BatchLayout":
        """The layout of a ``MegatronActor``'s Megatron parallel state."""
        from megatron.core import parallel_state as ps

        mp = ps.get_model_parallel_group()
        return cls(dp_rank=actor.info.dp_rank, dp_size=actor.info.dp_size,
                   mini_batch_size=actor.train_cfg.mini_batch_size, dp_group=ps.get_data_parallel_group(),
                   replica_group=mp if torch.distributed.get_world_size(mp) > 1 else None)


def dp_shard_rows(batch_size: int, mini_batch_size: int, dp_size: int, dp_rank: int) -> torch.Tensor:
    """Rows of a rollout batch that DP rank ``dp_rank`` trains on (``batching.rank_micro_batches``)."""
    mini = mini_batch_size or batch_size
    if batch_size % mini or mini % dp_size:
        raise ValueError(f"rollout batch of {batch_size} rows does not split into mini-batches of {mini} "
                         f"rows over {dp_size} data-parallel ranks")
    per = mini // dp_size
    return torch.cat([torch.arange(k * mini + dp_rank * per, k * mini + (dp_rank + 1) * per)
                      for k in range(batch_size // mini)])


def _comm_device() -> torch.device:
    if "nccl" in str(torch.distributed.get_backend()):  # NCCL moves CUDA tensors only
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _broadcast_fields(batch: Optional[TrainBatch], spec: list, device: torch.device) -> dict[str, torch.Tensor]:
    """Step 2: the full fields as one byte buffer from rank 0."""
    sizes = [int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in spec]
    last_stats["fields_bytes"] = sum(sizes)
    if batch is not None and torch.distributed.get_world_size() == 1:
        return {name: getattr(batch, name) for name, _, _ in spec}
    if batch is not None:
        buf = torch.cat([_as_bytes(getattr(batch, name)) for name, _, _ in spec]).to(device)
    else:
        buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    torch.distributed.broadcast(buf, src=0)
    buf = buf.cpu()
    out, off = {}, 0
    for (name, shape, dtype), n in zip(spec, sizes):
        out[name] = buf[off:off + n].view(dtype).reshape(shape).clone() if batch is None else getattr(batch, name)
        off += n
    return out


def _transfer_routes(compact: Optional[torch.Tensor], shape: tuple, dtype: torch.dtype, layout: BatchLayout,
                     device: torch.device, chunk_bytes: int) -> RouteRows:
    """Step 3: this rank's DP shard of the compact routes (scatter to leaders, broadcast in replicas)."""
    dist = torch.distributed
    b = shape[0]
    mine = dp_shard_rows(b, layout.mini_batch_size, layout.dp_size, layout.dp_rank)
    if compact is not None:  # rank 0 holds everything: keep its own shard
        return RouteRows(mine, compact[mine], b)  # advanced indexing copies: the full tensor can go
    per, row_shape = mine.numel(), tuple(shape[1:])
    data = torch.empty((per, *row_shape), dtype=dtype)
    leader = layout.replica_group is None or dist.get_rank(layout.replica_group) == 0
    row_bytes = max(1, int(torch.Size(row_shape).numel()) * data.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, per, step):
        n = min(step, per - start)
        chunk = torch.empty((n, *row_shape), dtype=dtype, device=device)
        if leader and layout.dp_size > 1:
            dist.scatter(chunk.view(torch.uint8), None, src=0, group=layout.dp_group)
        if layout.replica_group is not None:
            dist.broadcast(chunk.view(torch.uint8), src=dist.get_global_rank(layout.replica_group, 0),
                           group=layout.replica_group)
        data[start:start + n] = chunk.cpu()
    return RouteRows(mine, data, b)


def _send_routes(compact: torch.Tensor, layout: BatchLayout, device: torch.device, chunk_bytes: int) -> None:
    """Rank 0's side of step 3: scatter each DP replica's shard, then broadcast in its own replica."""
    dist = torch.distributed
    b = compact.shape[0]
    shards = [dp_shard_rows(b, layout.mini_batch_size, layout.dp_size, d) for d in range(layout.dp_size)]
    per, row_shape = shards[0].numel(), tuple(compact.shape[1:])
    row_bytes = max(1, int(torch.Size(row_shape).numel()) * compact.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, per, step):
        parts = [compact[rows[start:start + step]].to(device) for rows in shards]
        if layout.dp_size > 1:
            recv = torch.empty_like(parts[0])
            dist.scatter(recv.view(torch.uint8), [p.view(torch.uint8) for p in parts], src=0, group=layout.dp_group)
        if layout.replica_group is not None:
            dist.broadcast(parts[0].view(torch.uint8), src=0, group=layout.replica_group)


def _check_layout(layout: BatchLayout) -> None:
    dist = torch.distributed
    if layout.replica_group is not None and dist.get_rank() == 0 and dist.get_rank(layout.replica_group) != 0:
        raise RuntimeError("batch transfer: rank 0 must lead its data-parallel replica (group rank 0)")
    leader = layout.replica_group is None or dist.get_rank(layout.replica_group) == 0
    if leader and layout.dp_size > 1 and 0 not in dist.get_process_group_ranks(layout.dp_group or dist.group.WORLD):
        raise RuntimeError("batch transfer: the replica leaders' data-parallel group must contain rank 0")


def broadcast_batch(batch: Optional[TrainBatch], data_state: Optional[dict], error: Optional[str],
                    layout: Optional[BatchLayout] = None, *, validate: Optional[Callable[[TrainBatch], None]] = None,
                    chunk_bytes: int = 256 << 20) -> tuple[Optional[TrainBatch], Any]:
    """Collective: rank 0's batch (routes: this rank's DP shard) and data position on every rank.

    ``validate`` runs on rank 0 before anything is sent; its ValueError is raised on every rank
    (each rank sees only its shard of the routes, so the check must see the whole batch once).
    Rank 0's ``error`` is raised on every rank as RuntimeError. Returns (batch or None, state).
    """
    dist = torch.distributed
    layout = layout or BatchLayout(mini_batch_size=0)
    rank0 = dist.get_rank() == 0
    last_stats.clear()
    invalid = None
    compact: Optional[torch.Tensor] = None
    header: Any = None
    if rank0:
        if error is None and batch is not None and validate is not None:
            try:
                validate(batch)
            except ValueError as exc:
                invalid = str(exc)
        spec, routes = None, None
        if batch is not None and error is None and invalid is None:
            spec = [(f.name, tuple(getattr(batch, f.name).shape), getattr(batch, f.name).dtype)
                    for f in fields(TrainBatch) if f.name != "routed_experts" and getattr(batch, f.name) is not None]
            if batch.routed_experts is not None:
                compact = encode_routes(batch.routed_experts)
                routes = (tuple(compact.shape), compact.dtype)
        header = {"error": error, "invalid": invalid, "data_state": data_state, "fields": spec, "routes": routes}
    payload = [header]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    header = payload[0]
    if header["error"] is not None:
        raise RuntimeError(f"rollout failed on rank 0: {header['error']}")
    if header["invalid"] is not None:
        raise ValueError(header["invalid"])
    if header["fields"] is None:
        return None, header["data_state"]
    if dist.get_world_size() > 1:
        _check_layout(layout)
    device = _comm_device()
    got = _broadcast_fields(batch if rank0 else None, header["fields"], device)
    routes = None
    if header["routes"] is not None:
        shape, dtype = header["routes"]
        if rank0 and dist.get_world_size() > 1:
            _send_routes(compact, layout, device, chunk_bytes)
        routes = _transfer_routes(compact if rank0 else None, shape, dtype, layout, device, chunk_bytes)
        last_stats["routes_bytes"] = routes.nbytes
    out = TrainBatch(routed_experts=routes, **got)
    logger.debug("batch transfer: %s", last_stats)
    return out, header["data_state"]
