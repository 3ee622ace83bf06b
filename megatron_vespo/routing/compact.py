"""Compact routes and the rows of them one data-parallel rank holds.

``TrainBatch.routed_experts`` is [B, S, L, K] int64 with ``NO_ROUTE`` (-1) where no route was
recorded (``routes.py``). For Qwen3-30B-A3B (L = 48, K = 8) that is 3 KiB per token: 14.5 GB
for a 512 x 9216 rollout batch. Expert ids fit far smaller types, so routes travel and rest as

* ``uint8`` when every id is < 255 (``NO_ROUTE`` stored as 255): 128-expert Qwen3-MoE;
* ``int16`` when every id is < 32768 (``NO_ROUTE`` stays -1); ``int32`` beyond.

(int16 rather than uint16: NCCL has no 16-bit integer type and torch's uint16 supports few
ops; the batch transfer sends raw bytes anyway, so the width is what counts.)

A data-parallel rank only trains on its own rows (``train/batching.py``), so it only needs
their routes: :class:`RouteRows` holds the compact routes of some rows of a rollout batch and
answers ``routes[rows]`` with global row indices, decoded to int64, like the full tensor would.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from megatron_vespo.routing.routes import NO_ROUTE, validate_batch_routes

_UINT8_NONE = 255


def compact_dtype(max_id: int) -> torch.dtype:
    """The smallest dtype that holds expert ids 0..max_id and ``NO_ROUTE``."""
    if max_id < _UINT8_NONE:
        return torch.uint8
    if max_id < 2 ** 15:
        return torch.int16
    if max_id < 2 ** 31:
        return torch.int32
    raise ValueError(f"expert id {max_id} does not fit int32")


def encode_routes(routes: torch.Tensor, dtype: Optional[torch.dtype] = None, rows_per_chunk: int = 16) -> torch.Tensor:
    """int64 routes (``NO_ROUTE`` = -1) -> compact ``dtype`` (default: :func:`compact_dtype` of the max id).

    Converted ``rows_per_chunk`` rows at a time, so the only full-size allocation is the
    compact result (a whole-tensor ``where`` would briefly double the int64 routes).
    """
    if dtype is None:
        dtype = compact_dtype(int(routes.max()) if routes.numel() else 0)
    out = torch.empty(routes.shape, dtype=dtype, device=routes.device)
    for start in range(0, routes.shape[0], rows_per_chunk):
        r = routes[start:start + rows_per_chunk]
        if r.numel() and int(r.min()) < NO_ROUTE:
            raise ValueError(f"routes hold ids below NO_ROUTE ({NO_ROUTE}): {int(r.min())}")
        if dtype == torch.uint8:
            if r.numel() and int(r.max()) >= _UINT8_NONE:
                raise ValueError(f"expert id {int(r.max())} does not fit uint8 routes (max {_UINT8_NONE - 1})")
            r = torch.where(r == NO_ROUTE, torch.full_like(r, _UINT8_NONE), r)
        out[start:start + rows_per_chunk] = r.to(dtype)
    return out


def decode_routes(compact: torch.Tensor) -> torch.Tensor:
    """Compact routes -> int64 with ``NO_ROUTE`` (-1) where none was recorded."""
    out = compact.long()
    if compact.dtype == torch.uint8:
        out[compact == _UINT8_NONE] = NO_ROUTE
    return out


class RouteRows:
    """Compact routes of ``rows`` (global row indices) of a rollout batch of ``batch_size`` rows.

    Indexing with a tensor of global row indices returns their int64 routes [n, S, L, K]
    (``NO_ROUTE`` restored); asking for a row not held raises KeyError naming it.
    """

    def __init__(self, rows: torch.Tensor, data: torch.Tensor, batch_size: int):
        if data.dim() != 4 or data.shape[0] != rows.numel():
            raise ValueError(f"RouteRows: data {tuple(data.shape)} must be [{rows.numel()}, S, L, K]")
        self.rows = rows.long()
        self.data = data
        self.batch_size = int(batch_size)
        self._pos = torch.full((self.batch_size,), -1, dtype=torch.long)
        self._pos[self.rows] = torch.arange(self.rows.numel())

    @property
    def shape(self) -> torch.Size:
        """[B, S, L, K] of the whole rollout batch (as the full tensor's ``shape``)."""
        return torch.Size((self.batch_size, *self.data.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        """int64: what indexing returns."""
        return torch.long

    def dim(self) -> int:
        """4, as the full [B, S, L, K] tensor."""
        return 4

    @property
    def nbytes(self) -> int:
        """Bytes held (compact)."""
        return self.data.numel() * self.data.element_size()

    def __getitem__(self, rows: torch.Tensor | Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(rows, dtype=torch.long).flatten()
        pos = self._pos[idx]
        if bool((pos < 0).any()):
            missing = idx[pos < 0].tolist()
            raise KeyError(f"routes of rollout-batch rows {missing[:8]} are not held on this rank (it holds the rows "
                           "of its data-parallel shard only)")
        return decode_routes(self.data[pos])

    def chunks(self, rows_per_chunk: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(global rows, int64 routes) of the held rows, a few rows at a time."""
        for start in range(0, self.rows.numel(), rows_per_chunk):
            rows = self.rows[start:start + rows_per_chunk]
            yield rows, decode_routes(self.data[start:start + rows_per_chunk])


def validate_routes(routes: torch.Tensor | RouteRows, attention_lengths: torch.Tensor, *, num_moe_layers: int,
                    topk: int, num_experts: int, field: str = "TrainBatch.routed_experts",
                    rows_per_chunk: int = 8) -> None:
    """``routes.validate_batch_routes`` over the rows held, a few rows at a time.

    Chunks bound the temporary copies (the check gathers and sorts every route it reads) to a
    few rows instead of the whole rollout batch; errors name the global sample index.
    """
    if isinstance(routes, RouteRows):
        chunks: Iterator = routes.chunks(rows_per_chunk)
    else:
        if routes.dim() != 4 or routes.shape[0] != attention_lengths.shape[0]:
            validate_batch_routes(routes, attention_lengths, num_moe_layers=num_moe_layers, topk=topk,
                                  num_experts=num_experts, field=field)  # raises the shape error
        chunks = ((torch.arange(s, min(s + rows_per_chunk, routes.shape[0])), routes[s:s + rows_per_chunk].long())
                  for s in range(0, routes.shape[0], rows_per_chunk))
    for rows, r in chunks:
        validate_batch_routes(r, attention_lengths[rows], num_moe_layers=num_moe_layers, topk=topk,
                              num_experts=num_experts, field=field, sample_ids=rows.tolist())
