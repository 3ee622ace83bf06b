"""Splitting a rollout ``TrainBatch`` into mini-batches, DP shards and micro-batches.

Every rank receives the same full rollout batch (B = ``train.rollout_batch_size`` rows).
Update k (k = 0..N-1, N = rollout_batch_size / mini_batch_size) trains on rows
[k M, (k+1) M) (M = mini_batch_size, row order kept so prompt groups stay together);
data-parallel rank d takes the d-th of DP equal slices of it and cuts that into micro-batches
of ``micro_batch_size`` rows. The old-log-prob pass walks the same micro-batches, so a rank
records (R2) exactly the rows it later trains on.

Each mini-batch is trimmed to its longest row (right padding), rounded up to a multiple of
the TP size (sequence parallelism splits the sequence over TP ranks), so all micro-batches of
one schedule call share one length (pipeline p2p shapes are fixed per call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_vespo.config.base import ConfigError
from megatron_vespo.types import TrainBatch


@dataclass
class MicroBatch:
    """One micro-batch on one rank (all tensors on the model's device, length S).

    Attributes:
        rows: [b] indices of these rows in the rollout batch.
        tokens / position_ids: [b, S] int64.
        loss_mask: [b, S] float (mask of token s at position s).
        attention_lengths: [b] int64.
        advantages: [b] float.
        old_log_prob / rollout_log_probs: [b, S] or None.
        is_weights: [b, S] float rollout-IS (TIS/MIS) weights of ``loss.rollout_is``, detached,
            aligned like ``loss_mask`` (0 where it is 0), or None when rollout IS is off.
        routed_experts: [b, S, L, K] int64 routes to replay, or None.
        group_index: [b] int64 or None.
    """

    rows: torch.Tensor
    tokens: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    attention_lengths: torch.Tensor
    advantages: torch.Tensor
    old_log_prob: Optional[torch.Tensor] = None
    rollout_log_probs: Optional[torch.Tensor] = None
    routed_experts: Optional[torch.Tensor] = None
    group_index: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None

    @property
    def seq_len(self) -> int:
        """S."""
        return int(self.tokens.shape[1])


def validate_train_batch(batch: TrainBatch, expected_rows: Optional[int] = None) -> None:
    """Raise ValueError naming the ``TrainBatch`` field whose shape or dtype is wrong."""
    if batch.tokens.dim() != 2:
        raise ValueError(f"TrainBatch.tokens must be [B, S], got {tuple(batch.tokens.shape)}")
    b, s = batch.tokens.shape
    if expected_rows is not None and b != expected_rows:
        raise ValueError(f"TrainBatch has {b} rows but train.rollout_batch_size is {expected_rows}")
    for name in ("loss_mask", "rollout_log_probs"):
        t = getattr(batch, name)
        if t is not None and tuple(t.shape) != (b, s):
            raise ValueError(f"TrainBatch.{name} has shape {tuple(t.shape)}, expected {(b, s)}")
    for name in ("attention_lengths", "advantages", "group_index"):
        t = getattr(batch, name)
        if t is not None and tuple(t.shape) != (b,):
            raise ValueError(f"TrainBatch.{name} has shape {tuple(t.shape)}, expected ({b},)")
    if batch.routed_experts is not None and tuple(batch.routed_experts.shape[:2]) != (b, s):
        raise ValueError(f"TrainBatch.routed_experts has shape {tuple(batch.routed_experts.shape)}, expected "
                         f"[{b}, {s}, L, K]")
    lengths = batch.attention_lengths
    if bool((lengths < 1).any()) or bool((lengths > s).any()):
        raise ValueError(f"TrainBatch.attention_lengths must lie in [1, {s}]")
    beyond = batch.loss_mask * (torch.arange(s).unsqueeze(0) >= lengths.unsqueeze(1))
    if bool(beyond.any()):
        row = int(beyond.any(-1).nonzero()[0, 0])
        raise ValueError(f"TrainBatch.loss_mask of sample {row} is set beyond its attention length {int(lengths[row])}")
    if bool(batch.loss_mask[:, 0].any()):
        raise ValueError("TrainBatch.loss_mask[:, 0] must be 0: the first token has no prediction to train")


def check_divisibility(mini_batch_size: int, micro_batch_size: int, dp_size: int) -> None:
    """ConfigError unless each DP rank gets a whole number of micro-batches per mini-batch."""
    if mini_batch_size % (dp_size * micro_batch_size):
        raise ConfigError(f"train.mini_batch_size ({mini_batch_size}) must be a multiple of data-parallel size "
                          f"({dp_size}) x train.micro_batch_size ({micro_batch_size})")


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= n."""
    return -(-n // multiple) * multiple


def mini_batch_rows(batch_size: int, mini_batch_size: int, k: int) -> torch.Tensor:
    """Row indices of mini-batch k."""
    return torch.arange(k * mini_batch_size, (k + 1) * mini_batch_size)


def rank_micro_batches(batch: TrainBatch, rows: torch.Tensor, *, dp_rank: int, dp_size: int, micro_batch_size: int,
                       seq_multiple: int = 1, device: torch.device | str = "cpu",
                       old_log_prob: Optional[torch.Tensor] = None,
                       routes: Optional[torch.Tensor] = None,
                       is_weights: Optional[torch.Tensor] = None) -> list[MicroBatch]:
    """This DP rank's micro-batches of the mini-batch ``rows`` (trimmed and padded as documented).

    ``old_log_prob`` [B, S], ``routes`` [B, S, L, K] and ``is_weights`` [B, S] are
    rollout-batch-wide tensors to slice alongside (routes default to ``batch.routed_experts``).
    """
    check_divisibility(rows.numel(), micro_batch_size, dp_size)
    per_rank = rows.numel() // dp_size
    mine = rows[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    full_s = batch.tokens.shape[1]
    s = round_up(int(batch.attention_lengths[rows].max()), seq_multiple)
    routes = batch.routed_experts if routes is None else routes

    def cut(t: Optional[torch.Tensor], idx: torch.Tensor, pad_value: float = 0) -> Optional[torch.Tensor]:
        if t is None:
            return None
        t = t[idx]
        if s <= full_s:
            t = t[:, :s]
        else:  # the batch is shorter than a TP multiple: right-pad
            pad = torch.full((t.shape[0], s - full_s, *t.shape[2:]), pad_value, dtype=t.dtype)
            t = torch.cat([t, pad], dim=1)
        return t.to(device)

    out = []
    for start in range(0, per_rank, micro_batch_size):
        idx = mine[start:start + micro_batch_size]
        b = idx.numel()
        out.append(MicroBatch(
            rows=idx,
            tokens=cut(batch.tokens, idx),
            position_ids=torch.arange(s, device=device).unsqueeze(0).expand(b, s).contiguous(),
            loss_mask=cut(batch.loss_mask, idx).float(),
            attention_lengths=batch.attention_lengths[idx].to(device),
            advantages=batch.advantages[idx].float().to(device),
            old_log_prob=cut(old_log_prob, idx),
            rollout_log_probs=cut(batch.rollout_log_probs, idx),
            routed_experts=cut(routes, idx, pad_value=-1),
            group_index=None if batch.group_index is None else batch.group_index[idx].to(device),
            is_weights=cut(is_weights, idx),
        ))
    return out


def check_groups_whole(group_index: Optional[torch.Tensor], micro_batches: list[MicroBatch], loss_name: str) -> None:
    """Group-averaged losses (GEPO) need every prompt group inside one micro-batch."""
    if group_index is None:
        raise ValueError(f"loss '{loss_name}' averages over prompt groups: TrainBatch.group_index is required")
    seen: dict[int, int] = {}
    for i, mb in enumerate(micro_batches):
        for g in mb.group_index.tolist():
            if seen.setdefault(g, i) != i:
                raise ConfigError(f"loss '{loss_name}' needs whole prompt groups per micro-batch but group {g} spans "
                                  "micro-batches: make train.micro_batch_size a multiple of the group size")
