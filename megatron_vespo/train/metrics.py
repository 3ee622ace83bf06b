"""Assembling per-rank micro-batch results into batch tensors, and per-update metrics.

Every rank holds the whole rollout batch, so results are placed by row index:
``gather_rows`` collects each DP rank's (rows, values) pairs from the last pipeline stage,
all-gathers them over the data-parallel group and broadcasts them over the pipeline group,
giving every rank the same [B, S] tensor.

``update_metrics`` computes the reported numbers on the *whole* mini-batch: the registry
loss and its own metrics (VESPO's W, phi, ESS ...), entropy, the KL of the current policy
to the old one, PPO-style ratio clip fractions and the sequence importance weight.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from megatron_vespo.losses import compute_policy_loss


def gather_rows(pieces: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_size: int, seq_len: int, *,
                dp_group: Optional[object], pp_group: Optional[object], pp_last_rank: int,
                is_last_stage: bool, fill: float = 0.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Scatter (rows [b], values [b, s<=seq_len]) pieces of all DP ranks into one [batch_size, seq_len] tensor.

    Communication happens on ``device`` (the model's device: NCCL needs CUDA tensors); the
    result is returned on the CPU.
    """
    out = torch.full((batch_size, seq_len), fill, dtype=torch.float32, device=device)
    rows_mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for rows, vals in pieces:
        rows = rows.to(device)
        vals = vals[:, :seq_len]  # micro-batches padded past the batch width (FP8 / SP multiples) carry only padding
        out[rows, :vals.shape[1]] = vals.float().to(device)
        rows_mask[rows] = True
    if torch.distributed.is_initialized():
        if is_last_stage and dp_group is not None and torch.distributed.get_world_size(dp_group) > 1:
            stacked = torch.cat([out, rows_mask.float().unsqueeze(1)], dim=1)
            parts = [torch.empty_like(stacked) for _ in range(torch.distributed.get_world_size(dp_group))]
            torch.distributed.all_gather(parts, stacked, group=dp_group)
            out = torch.zeros_like(out)
            for p in parts:
                has = p[:, -1] > 0
                out[has] = p[has, :-1]
        if pp_group is not None and torch.distributed.get_world_size(pp_group) > 1:
            torch.distributed.broadcast(out, src=pp_last_rank, group=pp_group)
    return out.cpu()


def broadcast_from_last_stage(obj: Any, pp_group: Optional[object], pp_last_rank: int) -> Any:
    """Send a picklable object from the last pipeline stage to the others."""
    if pp_group is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size(pp_group) == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=pp_last_rank, group=pp_group)
    return box[0]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``x`` over ``mask`` > 0 (0 when empty)."""
    m = mask > 0
    return float(x[m].mean()) if bool(m.any()) else 0.0


@torch.no_grad()
def update_metrics(*, loss_name: str, loss_params: dict, loss_agg_mode: Optional[str], log_prob: torch.Tensor,
                   old_log_prob: torch.Tensor, entropy: Optional[torch.Tensor], advantages: torch.Tensor,
                   mask: torch.Tensor, rollout_is_weights: Optional[torch.Tensor], group_index: Optional[torch.Tensor],
                   global_denominator: Optional[float], clip_eps: float = 0.2,
                   loss_metrics: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Registry loss + metrics on the whole mini-batch and the actor's own diagnostics.

    Args are [M, S] tensors of the mini-batch (``advantages`` [M]); ``global_denominator`` is
    the value the micro-batch calls used, so ``loss`` is the exact mini-batch loss.
    ``loss_metrics``: what ``compute_policy_loss`` returned for exactly this mini-batch (the
    training step's own call when the mini-batch was one micro-batch); the loss is then not
    computed again.
    """
    if loss_metrics is None:
        _, loss_metrics = compute_policy_loss(
            loss_name, log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, response_mask=mask,
            loss_agg_mode=loss_agg_mode, rollout_is_weights=rollout_is_weights, group_index=group_index,
            global_denominator=global_denominator, **loss_params)
    metrics = loss_metrics
    out = {f"loss/{k}" if k != "loss" else "loss": v for k, v in metrics.items()}
    log_ratio = (log_prob - old_log_prob) * mask
    ratio = torch.exp(log_ratio)
    out["entropy"] = masked_mean(entropy, mask) if entropy is not None else float("nan")
    # KL(pi_old || pi) estimated on tokens sampled from pi_old: E[r - 1 - log r], r = pi / pi_old (k3)
    out["kl_old"] = masked_mean(ratio - 1.0 - log_ratio, mask)
    out["ratio/mean"] = masked_mean(ratio, mask)
    out["ratio/clipfrac_low"] = masked_mean((ratio < 1.0 - clip_eps).float(), mask)
    out["ratio/clipfrac_high"] = masked_mean((ratio > 1.0 + clip_eps).float(), mask)
    out["ratio/clipfrac"] = out["ratio/clipfrac_low"] + out["ratio/clipfrac_high"]
    seq_log_w = log_ratio.sum(dim=-1)
    nonempty = mask.sum(-1) > 0
    out["is/seq_log_w_mean"] = float(seq_log_w[nonempty].mean()) if bool(nonempty.any()) else 0.0
    out["is/seq_log_w_absmax"] = float(seq_log_w[nonempty].abs().max()) if bool(nonempty.any()) else 0.0
    out["is/ess"] = normalized_ess(seq_log_w[nonempty])
    out["response_tokens"] = float(mask.sum())
    return out


def normalized_ess(log_w: torch.Tensor) -> float:
    """Kish's effective sample size over n, (sum W)^2 / (n sum W^2), of sequence weights given by
    their logs [n] (computed in log space: W itself overflows at stale data); 1.0 for n = 0.

    Loss-independent, so every loss's updates report how degenerate the sequence weights
    pi / pi_old of the mini-batch are (VESPO also logs the ESS of its reshaped weights).
    """
    if log_w.numel() == 0:
        return 1.0
    lw = log_w.double()
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / lw.numel())
