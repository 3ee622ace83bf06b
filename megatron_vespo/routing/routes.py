"""Route tensors between the rollout engine, ``TrainBatch`` and Megatron's routers.

Three forms of the same information (K = top-k, L = number of MoE layers):

1. ``Sample.routed_experts`` [P + T - 1, L, K] (uint8/int16/int32): what SGLang returns, one
   row per token that went through a forward pass, i.e. every token but the last.
2. ``TrainBatch.routed_experts`` [B, S, L, K] int64, aligned with ``tokens``: row s holds the
   experts token s was routed to. Positions without a route (the last real token and the
   right padding) hold ``NO_ROUTE`` (-1) when built by :func:`collate_routes`.
3. What Megatron's ``RouterReplay`` consumes: per MoE layer, an int64 [S_local * b, K] tensor
   whose rows follow the router's flattened [S, b, H] input, i.e. sequence-major
   (row = s * b + j); with sequence parallelism, S_local is this TP rank's contiguous shard.

Alignment (why the missing last route is harmless): log-prob of token s comes from the
logits at position s - 1, and under a causal mask position p only influences positions >= p.
The route of the last real token n - 1 therefore only changes the prediction of token n,
which does not exist, and padding comes after it. The trainer feeds the full sequence and
replays a filler route (K distinct experts, spread over all experts) at every
position >= n - 1; every trained log-prob is computed exactly as under the engine's routes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

NO_ROUTE = -1


def sample_routes_to_rows(routed_experts: torch.Tensor, seq_len: int, *, sample: object = None) -> torch.Tensor:
    """``Sample.routed_experts`` [P + T - 1, L, K] -> [seq_len, L, K] int64 (``NO_ROUTE`` beyond).

    ``sample`` names the sample in error messages (index or id).
    """
    if routed_experts.dim() != 3:
        raise ValueError(f"sample {sample}: routed_experts must be [tokens - 1, L, K], got "
                         f"{tuple(routed_experts.shape)}")
    n = routed_experts.shape[0]
    if n > seq_len - 1:
        raise ValueError(f"sample {sample}: routed_experts has {n} rows, more than seq_len - 1 = {seq_len - 1}")
    out = torch.full((seq_len, *routed_experts.shape[1:]), NO_ROUTE, dtype=torch.long)
    out[:n] = routed_experts.long()
    return out


def collate_routes(per_sample: Sequence[torch.Tensor], lengths: Sequence[int], seq_len: int) -> torch.Tensor:
    """Stack ``Sample.routed_experts`` of a batch into ``TrainBatch.routed_experts`` [B, S, L, K].

    Checks each sample holds exactly ``length - 1`` rows (SGLang's count) and that all samples
    agree on [L, K]; errors name the sample index.
    """
    if len(per_sample) != len(lengths):
        raise ValueError(f"{len(per_sample)} route tensors for {len(lengths)} samples")
    rows = []
    for i, (r, n) in enumerate(zip(per_sample, lengths)):
        if r.dim() != 3 or r.shape[0] != n - 1:
            raise ValueError(f"sample {i}: routed_experts has shape {tuple(r.shape)}, expected "
                             f"[{n - 1}, L, K] (prompt + response - 1 tokens)")
        if r.shape[1:] != per_sample[0].shape[1:]:
            raise ValueError(f"sample {i}: routed_experts is [.., {r.shape[1]}, {r.shape[2]}] but sample 0 is "
                             f"[.., {per_sample[0].shape[1]}, {per_sample[0].shape[2]}]")
        rows.append(sample_routes_to_rows(r, seq_len, sample=i))
    return torch.stack(rows)


def validate_batch_routes(routes: torch.Tensor, attention_lengths: torch.Tensor, *, num_moe_layers: int,
                          topk: int, num_experts: int, field: str = "TrainBatch.routed_experts",
                          sample_ids: Optional[Sequence[object]] = None) -> None:
    """Raise ValueError naming the sample if ``routes`` cannot be replayed on this model.

    Every position s < length - 1 of sample b must hold K distinct expert ids in [0, E).
    """
    b, s = attention_lengths.shape[0], int(routes.shape[1]) if routes.dim() == 4 else -1
    if routes.dim() != 4 or routes.shape[0] != b or routes.shape[2] != num_moe_layers or routes.shape[3] != topk:
        raise ValueError(f"{field} has shape {tuple(routes.shape)}, expected [B={b}, S, L={num_moe_layers}, "
                         f"K={topk}] for this model")
    pos = torch.arange(s)
    needed = pos.unsqueeze(0) < (attention_lengths.unsqueeze(1) - 1)  # [B, S]
    r = routes[needed]  # [N, L, K]
    bad_range = ((r < 0) | (r >= num_experts)).flatten(1).any(-1)
    sorted_r = r.sort(dim=-1).values
    dup = (sorted_r[..., 1:] == sorted_r[..., :-1]).flatten(1).any(-1) if topk > 1 else torch.zeros_like(bad_range)
    for bad, what in ((bad_range, f"an expert id outside [0, {num_experts}) (or no route)"),
                      (dup, "the same expert twice in one top-k row")):
        if bool(bad.any()):
            idx = needed.nonzero()[bad.nonzero()[0, 0]]
            row, col = int(idx[0]), int(idx[1])
            name = sample_ids[row] if sample_ids is not None else row
            raise ValueError(f"{field}: sample {name} position {col} (length {int(attention_lengths[row])}) holds "
                             f"{what}: {routes[row, col].tolist()}")


def filler_route(topk: int) -> torch.Tensor:
    """[K] the route replayed where none is recorded: experts 0..K-1 (distinct)."""
    return torch.arange(topk, dtype=torch.long)


def fill_unrouted(routes: torch.Tensor, attention_lengths: torch.Tensor,
                  num_experts: Optional[int] = None) -> torch.Tensor:
    """Copy of [b, S, L, K] ``routes`` with every position >= length - 1 set to a filler route.

    Without ``num_experts`` the filler is :func:`filler_route` (experts 0..K-1). With it,
    position p gets experts (p K + j) mod E, j < K: distinct within the row and spread evenly
    over all experts, so right padding (often most tokens of a mini-batch trimmed to its
    longest row) does not all land on experts 0..K-1 -- under expert parallelism that sent
    every padding token of the step to EP rank 0 (load and memory spike).
    """
    s, k = routes.shape[1], routes.shape[3]
    out = routes.clone()
    lengths = attention_lengths.to(routes.device)
    pos = torch.arange(s, device=routes.device)
    tail = pos.unsqueeze(0) >= (lengths.unsqueeze(1) - 1)
    if num_experts is None:
        out[tail] = filler_route(k).to(routes.device)
        return out
    if num_experts < k:
        raise ValueError(f"num_experts ({num_experts}) must be >= top-k ({k})")
    spread = (pos.unsqueeze(1) * k + torch.arange(k, device=routes.device)) % num_experts  # [S, K]
    filler = spread[:, None, :].expand(s, routes.shape[2], k).to(routes.dtype)  # [S, L, K]
    out[tail] = filler.unsqueeze(0).expand_as(routes)[tail]
    return out


def replay_tensors(routes: torch.Tensor, layers: Sequence[int], *, tp_rank: int = 0, tp_size: int = 1,
                   sequence_parallel: bool = False) -> list[torch.Tensor]:
    """Per-layer RouterReplay targets for one micro-batch on this rank.

    Args:
        routes: [b, S, L, K] int64 micro-batch routes (already filled, see :func:`fill_unrouted`).
        layers: MoE-layer ordinals (indices into L) of the routers on this pipeline stage, in
            router construction order.
        tp_rank / tp_size / sequence_parallel: with SP each TP rank routes its contiguous
            sequence shard S / tp_size.

    Returns:
        one [S_local * b, K] int64 tensor per entry of ``layers``, rows sequence-major.
    """
    b, s, n_layers, k = routes.shape
    if sequence_parallel and tp_size > 1:
        if s % tp_size:
            raise ValueError(f"sequence length {s} is not divisible by tensor_model_parallel_size {tp_size}")
        shard = s // tp_size
        routes = routes[:, tp_rank * shard:(tp_rank + 1) * shard]
    out = []
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"MoE layer {layer} is outside the {n_layers} layers of the routes")
        out.append(routes[:, :, layer].transpose(0, 1).reshape(-1, k).contiguous())
    return out
