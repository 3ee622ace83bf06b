"""Shared batch factory for the loss tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch


@dataclass
class Batch:
    """Random loss inputs: [B, T] log-probs and mask, [B] advantages, [B] groups."""

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    group_index: torch.Tensor
    rollout_is_weights: Optional[torch.Tensor] = None

    def kwargs(self, **extra) -> dict:
        """Keyword arguments for compute_policy_loss (log_prob is a fresh leaf requiring grad)."""
        out = dict(log_prob=self.log_prob, old_log_prob=self.old_log_prob, advantages=self.advantages,
                   response_mask=self.mask, group_index=self.group_index,
                   rollout_is_weights=self.rollout_is_weights)
        out.update(extra)
        return out


def make_batch(B: int = 8, T: int = 9, *, seed: int = 0, delta_scale: float = 0.3, groups: int = 2,
               dtype: torch.dtype = torch.float64, empty_row: bool = True, tis: bool = False) -> Batch:
    """Random batch with varied lengths, one empty row (optional), both advantage signs and a zero one."""
    gen = torch.Generator().manual_seed(seed)
    log_prob = -(torch.rand(B, T, generator=gen, dtype=torch.float64) * 3.0 + 0.05)
    old = log_prob + delta_scale * torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    if empty_row and B > 2:
        lengths[1] = 0
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    if B > 3:
        adv[3] = 0.0
    group_index = torch.arange(B) % groups if groups else torch.zeros(B, dtype=torch.int64)
    group_index = torch.sort(group_index).values
    w = None
    if tis:
        w = torch.exp(0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=2.0) * mask

    def cast(t):
        return None if t is None else t.to(dtype)

    return Batch(log_prob=cast(log_prob).requires_grad_(True), old_log_prob=cast(old), advantages=cast(adv),
                 mask=mask, group_index=group_index, rollout_is_weights=cast(w))


@pytest.fixture(scope="session")
def batch_factory():
    """The :func:`make_batch` factory (session-scoped so hypothesis tests may use it)."""
    return make_batch
