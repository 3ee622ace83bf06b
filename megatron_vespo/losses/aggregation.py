"""Reduce a per-token loss matrix to a scalar, exactly as verl's ``agg_loss`` does.

Shapes: ``loss_mat`` and ``mask`` are [B, T] (B rows = sequences, T = padded response
length); ``mask`` is bool or 0/1 float. Modes (verl names):

=========================  ==================================================  =========================
mode                       loss                                                ``global_denominator`` D
=========================  ==================================================  =========================
token-mean                 sum_{i,t} m l / D                                   valid tokens
seq-mean-token-sum         sum_i (sum_t m l) / D                               non-empty rows
seq-mean-token-mean        sum_i (sum_t m l / n_i) / D                         non-empty rows
seq-mean-token-sum-norm    sum_i (sum_t m l) / D          (verl: D = T)        a fixed length (constant)
=========================  ==================================================  =========================

Without ``global_denominator`` D is computed from ``mask`` itself, which reproduces
verl (apart from empty batches: D is floored at 1 so a fully masked call yields 0, where
verl divides 0 by 0). ``seq-mean-token-mean`` divides each row by ``n_i + 1e-8`` as verl does
(``core_algos.agg_loss``; also the VESPO authors' copy), so it agrees with verl bit for bit; an
empty row has a zero sum and contributes 0 either way.

Micro-batching (how the Megatron actor uses this)
-------------------------------------------------
Every mode is ``(sum over the call's rows of something) / D``. So if the actor splits a
mini-batch into micro-batches (and DP ranks), computes each micro-batch loss with the
*same* ``global_denominator`` D = the mini-batch value, and sums the micro-batch losses,
it gets exactly the loss of the whole mini-batch in one call:

* D is additive for token-mean / seq-mean-* modes (and for the per-row and per-group
  reductions of gmpo / gepo, see ``registry.loss_denominator``): compute the local count
  on every micro-batch with :func:`local_denominator`, sum over micro-batches, all-reduce
  (SUM) over the data-parallel (and context-parallel) group, then pass the result.
* For ``seq-mean-token-sum-norm`` D is not a count but a constant (verl uses the padded
  length T of the call, which differs between micro-batches); pass a fixed value such as
  the maximum response length. :func:`local_denominator` refuses this mode for that reason.
* Megatron's DDP *averages* gradients over DP ranks. A loss normalised by the global D
  already is the global mean, so the actor must multiply by the DP size (verl's
  ``* dp_size``) or configure DDP to sum; this library never multiplies by DP size.
"""

from __future__ import annotations

from typing import Union

import torch

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

Denominator = Union[float, int, torch.Tensor]
ROW_EPS = 1e-8  # verl agg_loss: per-row token count + 1e-8 in seq-mean-token-mean


def check_agg_mode(mode: str, argument: str = "loss_agg_mode") -> str:
    """Return ``mode`` if it is a known aggregation mode, else raise ValueError naming ``argument``."""
    if mode not in AGG_MODES:
        raise ValueError(f"{argument}={mode!r} is not an aggregation mode; choose one of {', '.join(AGG_MODES)}")
    return mode


def _as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > 0


def _check_denominator(global_denominator: Denominator | None) -> None:
    if global_denominator is None or isinstance(global_denominator, torch.Tensor):
        return
    if not float(global_denominator) > 0:
        raise ValueError(f"global_denominator must be > 0 (a token, sequence or group count), got {global_denominator}")


def divide_by_denominator(total: torch.Tensor, global_denominator: Denominator | None,
                          local: torch.Tensor | int) -> torch.Tensor:
    """``total / D`` with D = ``global_denominator`` if given, else the local count floored at 1."""
    _check_denominator(global_denominator)
    if global_denominator is None:
        if not isinstance(local, torch.Tensor):
            return total / float(max(local, 1))
        return total / local.clamp(min=1).to(total.dtype)
    if isinstance(global_denominator, torch.Tensor):
        return total / global_denominator.to(device=total.device, dtype=total.dtype)
    return total / float(global_denominator)


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    global_denominator: Denominator | None = None,
) -> torch.Tensor:
    """Aggregate a [B, T] per-token loss into a scalar (verl ``agg_loss`` semantics).

    Args:
        loss_mat: [B, T] per-token loss.
        mask: [B, T] bool or 0/1 float; masked entries contribute neither value nor gradient,
            even if they hold inf/NaN.
        mode: one of :data:`AGG_MODES`.
        global_denominator: D of the table in the module docstring, for micro-batch / DP
            splitting; None computes it from ``mask``.

    Returns:
        0-d tensor.
    """
    check_agg_mode(mode, "mode")
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    _check_denominator(global_denominator)
    valid = _as_bool_mask(mask)
    # where() rather than multiply: a masked inf/NaN must not turn into NaN (0 * inf).
    masked = torch.where(valid, loss_mat, torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device))
    if mode == "token-mean":
        return divide_by_denominator(masked.sum(), global_denominator, valid.sum())
    if mode == "seq-mean-token-sum-norm":
        if global_denominator is None:
            return masked.sum() / float(max(loss_mat.shape[-1], 1))
        return divide_by_denominator(masked.sum(), global_denominator, valid.sum())
    row_sum = masked.sum(dim=-1)
    counts = valid.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        # verl's ``n_i + 1e-8`` (not max(n_i, 1)): a relative 1e-8 that a bit-for-bit comparison sees
        row_sum = row_sum / (counts.to(row_sum.dtype) + ROW_EPS)
    # Empty rows have row_sum == 0, so they only need excluding from the denominator.
    return divide_by_denominator(row_sum.sum(), global_denominator, (counts > 0).sum())


def local_denominator(mask: torch.Tensor, mode: str) -> float:
    """The additive part of D for one micro-batch: valid tokens (token-mean) or non-empty rows.

    Sum it over micro-batches and all-reduce it over DP ranks to get ``global_denominator``.
    ``seq-mean-token-sum-norm`` has a constant D (e.g. the max response length) and is refused.
    """
    check_agg_mode(mode, "mode")
    valid = _as_bool_mask(mask)
    if mode == "token-mean":
        return float(valid.sum().item())
    if mode == "seq-mean-token-sum-norm":
        raise ValueError("seq-mean-token-sum-norm divides by a fixed length, not a count: pass a constant such as "
                         "the maximum response length as global_denominator instead of summing local values")
    return float((valid.sum(dim=-1) > 0).sum().item())


def whole_batch_denominator(mask: torch.Tensor, mode: str) -> float:
    """D of the table for a mini-batch held whole (every rank has all its rows), floored at 1.

    The counting modes give :func:`local_denominator` of the whole mask (already the sum over its
    micro-batches and DP shards). ``seq-mean-token-sum-norm`` gets its constant: the longest
    response in the mini-batch (verl's padded length T of a batch trimmed to its longest row), so
    every micro-batch divides by the same number.
    """
    check_agg_mode(mode, "mode")
    if mode == "seq-mean-token-sum-norm":
        longest = int(_as_bool_mask(mask).sum(dim=-1).max()) if mask.numel() else 0
        return float(max(longest, 1))
    return max(local_denominator(mask, mode), 1.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over true entries of ``mask`` (0 when there are none)."""
    valid = _as_bool_mask(mask)
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / valid.sum().clamp(min=1).to(values.dtype)


def masked_row_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] sum over the valid tokens of each row."""
    valid = _as_bool_mask(mask)
    return torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=-1)
