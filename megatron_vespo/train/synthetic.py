"""Synthetic rollout batches for tests, benchmarks and CPU smoke runs (no rollout engine)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_vespo.types import TrainBatch


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, *, prompt_len: int = 4,
                    min_len: Optional[int] = None, seed: int = 0, group_size: int = 1,
                    num_moe_layers: int = 0, topk: int = 0, num_experts: int = 0) -> TrainBatch:
    """A right-padded ``TrainBatch`` with random tokens, lengths in [min_len, seq_len] and advantages.

    Rows have ``prompt_len`` prompt tokens and a response up to the row's length; advantages
    are +-1 alternating by group; with ``num_moe_layers`` > 0, random distinct routes
    [B, S, L, K] are attached (``-1`` at the last token and padding, as ``routing.routes``).
    """
    g = torch.Generator().manual_seed(seed)
    min_len = min_len or max(prompt_len + 2, seq_len // 2)
    lengths = torch.randint(min_len, seq_len + 1, (batch_size,), generator=g)
    lengths[0] = seq_len  # at least one full-length row
    tokens = torch.randint(3, vocab_size, (batch_size, seq_len), generator=g)
    pos = torch.arange(seq_len).unsqueeze(0)
    tokens = torch.where(pos < lengths.unsqueeze(1), tokens, torch.zeros_like(tokens))
    loss_mask = ((pos >= prompt_len) & (pos < lengths.unsqueeze(1))).float()
    group_index = torch.arange(batch_size) // group_size
    advantages = torch.where(group_index % 2 == 0, 1.0, -1.0)
    rollout_lp = -torch.rand(batch_size, seq_len, generator=g) * 3.0 * loss_mask
    routes = None
    if num_moe_layers:
        scores = torch.rand(batch_size, seq_len, num_moe_layers, num_experts, generator=g)
        routes = scores.topk(topk, dim=-1).indices.long()
        routes[pos.squeeze(0).unsqueeze(0).expand(batch_size, -1) >= (lengths.unsqueeze(1) - 1)] = -1
    return TrainBatch(tokens=tokens, loss_mask=loss_mask, attention_lengths=lengths, advantages=advantages,
                      rollout_log_probs=rollout_lp, routed_experts=routes, group_index=group_index,
                      policy_version=torch.zeros(batch_size, dtype=torch.long))
