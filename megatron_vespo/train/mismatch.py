"""Train/inference mismatch diagnostics: how far the rollout engine's numbers are from the trainer's.

Two sources of off-policyness exist even at staleness N = 1: the rollout engine's log-probs
differ from the trainer's for the same weights (kernels, precision, batch shapes), and MoE
routers can pick different experts for the same token (routing drift). Both are measured on
the data the trainer receives, before any update:

- ``log_prob_mismatch(train_lp, rollout_lp, mask)``: token |log pi_train - log mu_rollout|
  statistics, the sequence log-ratio (what a sequence-level IS weight multiplies), and the k3
  estimate of KL(mu || pi) under rollout samples: E[exp(d) - 1 - d], d = log pi - log mu.
- ``routing_agreement(trainer_routes, rollout_routes)``: among token-layers where both sides
  routed (``NO_ROUTE`` excluded), the fraction of the rollout's top-k experts the trainer also
  chose, and the fraction of token-layers whose top-k sets are identical.

Shapes: log-probs and mask [B, S]; routes [B, S, L, K] int64. Pure torch.
"""

from __future__ import annotations

import torch

from megatron_vespo.routing.routes import NO_ROUTE


def log_prob_mismatch(train_lp: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Statistics of log pi_train - log mu_rollout over masked tokens (empty mask -> zeros)."""
    if train_lp.shape != rollout_lp.shape or train_lp.shape != mask.shape:
        raise ValueError(f"log-probs {tuple(train_lp.shape)} / {tuple(rollout_lp.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same [B, S] shape")
    m = mask > 0
    if not m.any():
        return {"mismatch/abs_diff_mean": 0.0, "mismatch/abs_diff_max": 0.0, "mismatch/k3_kl": 0.0,
                "mismatch/seq_log_ratio_absmax": 0.0, "mismatch/seq_log_ratio_mean": 0.0}
    d = (train_lp.double() - rollout_lp.double()).clamp(-20, 20)
    tok = d[m]
    seq = (d * m).sum(-1)[m.any(-1)]
    return {
        "mismatch/abs_diff_mean": tok.abs().mean().item(),
        "mismatch/abs_diff_max": tok.abs().max().item(),
        "mismatch/k3_kl": (tok.exp() - 1 - tok).mean().item(),
        "mismatch/seq_log_ratio_absmax": seq.abs().max().item(),
        "mismatch/seq_log_ratio_mean": seq.mean().item(),
    }


def routing_agreement_counts(trainer_routes: torch.Tensor, rollout_routes: torch.Tensor) -> torch.Tensor:
    """[3] float64 counts: (shared experts, routed token-layers, token-layers with identical top-k sets).

    Counts (not ratios) so ranks can sum them before dividing.
    """
    if trainer_routes.shape != rollout_routes.shape or trainer_routes.dim() != 4:
        raise ValueError(f"routes must both be [B, S, L, K]; got {tuple(trainer_routes.shape)} and "
                         f"{tuple(rollout_routes.shape)}")
    valid = (trainer_routes[..., 0] != NO_ROUTE) & (rollout_routes[..., 0] != NO_ROUTE)  # [B, S, L]
    # |set(rollout) & set(trainer)| per token-layer (top-k entries are distinct experts)
    shared = (rollout_routes.unsqueeze(-1) == trainer_routes.unsqueeze(-2)).any(-1).sum(-1)[valid]
    k = trainer_routes.shape[-1]
    return torch.tensor([shared.sum().item(), valid.sum().item(), (shared == k).sum().item()], dtype=torch.float64)


def routing_agreement(counts: torch.Tensor, topk: int) -> dict[str, float]:
    """Ratios from (possibly rank-summed) ``routing_agreement_counts``; empty when nothing was routed."""
    shared, token_layers, exact = counts.tolist()
    if token_layers == 0:
        return {}
    return {"routing/expert_overlap": shared / (token_layers * topk), "routing/exact_match": exact / token_layers}
