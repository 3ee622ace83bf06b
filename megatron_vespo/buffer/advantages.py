"""Group-relative advantages (GRPO family), computed per prompt group.

For a group of n responses to one prompt with rewards r_1..r_n:

- ``grpo``:     A_i = (r_i - mean(r)) / (std(r) + eps)   (DeepSeekMath, Shao et al. 2024)
- ``drgrpo``:   A_i = r_i - mean(r)                      (Dr. GRPO, Liu et al. 2025: no std)
- ``rloo``:     A_i = r_i - mean_{j != i}(r_j)           (leave-one-out baseline)

``std`` is the unbiased sample std as verl computes it; a group of one response gets
advantage 0 (there is nothing to compare against). Shapes: rewards [B], group_index [B]
-> advantages [B].
"""

from __future__ import annotations

from typing import Literal

import torch

AdvantageEstimator = Literal["grpo", "drgrpo", "rloo"]


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor,
                     estimator: AdvantageEstimator = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Return [B] advantages normalised within each prompt group.

    Args:
        rewards: [B] float rewards.
        group_index: [B] integer prompt-group ids (any values; rows of one group need not be adjacent).
        estimator: ``grpo``, ``drgrpo`` or ``rloo`` (see module docstring).
        eps: added to the std for ``grpo``.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(f"rewards and group_index must both be [B]; got {tuple(rewards.shape)} and "
                         f"{tuple(group_index.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    if estimator not in ("grpo", "drgrpo", "rloo"):
        raise ValueError(f"unknown advantage estimator '{estimator}'; use grpo, drgrpo or rloo")
    rewards = rewards.double()
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, rewards)
    counts_f = counts.double()
    mean = sums / counts_f
    n = counts_f[inverse]
    if estimator == "rloo":
        baseline = (sums[inverse] - rewards) / (n - 1).clamp(min=1)
        adv = rewards - baseline
    else:
        adv = rewards - mean[inverse]
        if estimator == "grpo":
            sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, adv * adv)
            std = (sq / (counts_f - 1).clamp(min=1)).sqrt()
            adv = adv / (std[inverse] + eps)
    adv = torch.where(n > 1, adv, torch.zeros_like(adv))
    return adv.float()
