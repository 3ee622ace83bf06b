"""Validated, normalised inputs shared by every policy loss.

Shapes: B rows (sequences), T padded response length.

* ``log_prob`` [B, T]: log pi_theta(y_t), carries the gradient.
* ``old_log_prob`` [B, T]: log pi_old(y_t) (behaviour policy mu; the VESPO paper's mu).
* ``advantages`` [B, T] or [B]. Stored as [B, T] or [B, 1] (broadcastable).
* ``response_mask`` [B, T] bool or 0/1 float.
* ``rollout_is_weights`` [B, T] >= 0, detached TIS/MIS weights (``rollout_is.py``), or None.
* ``group_index`` [B] integer prompt-group ids, or None.

Every problem raises ValueError naming the argument. Sequence-level losses (VESPO, GMPO,
GEPO, SNIS) need one advantage per sequence: [B, T] advantages must be constant over each
row's valid tokens (padding may hold anything, e.g. GRPO's zeros) or they are rejected,
rather than silently using column 0 as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from megatron_vespo.losses.aggregation import Denominator, masked_row_sum

# Relative tolerance for "advantages are constant along a row" (fp32 rounding of GRPO's A * mask).
_ADV_RTOL = 1e-5


@dataclass
class PolicyLossInput:
    """What a registered loss function receives (already validated).

    Attributes:
        log_prob: [B, T] current-policy log-probs (requires grad in training).
        old_log_prob: [B, T] behaviour-policy log-probs.
        advantages: [B, T] or [B, 1] advantages, broadcastable against [B, T].
        mask: [B, T] float mask in the dtype of ``log_prob`` (1 = trained token).
        valid: [B, T] bool mask.
        rollout_is_weights: [B, T] detached weights or None.
        group_index: [B] int64 dense group ids in [0, num_groups) or None.
        num_groups: number of distinct groups (0 without ``group_index``).
        loss_agg_mode: resolved aggregation mode (None for losses that ignore it).
        global_denominator: D for micro-batch / DP splitting (see ``aggregation``), or None.
    """

    log_prob: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    rollout_is_weights: Optional[torch.Tensor]
    group_index: Optional[torch.Tensor]
    num_groups: int
    loss_agg_mode: Optional[str]
    global_denominator: Optional[Denominator]

    @property
    def lengths(self) -> torch.Tensor:
        """[B] number of valid tokens per row (float)."""
        return self.mask.sum(dim=-1)

    @property
    def nonempty(self) -> torch.Tensor:
        """[B] bool, rows with at least one valid token."""
        return self.valid.any(dim=-1)

    def seq_advantages(self) -> torch.Tensor:
        """[B] one advantage per sequence (the row's constant value; 0 for empty [B, T] rows)."""
        if self.advantages.shape[-1] == 1:
            return self.advantages[:, 0]
        return masked_row_sum(self.advantages, self.valid) / self.lengths.clamp(min=1)


def _check_tensor(name: str, x: object, shape: tuple[int, ...], ref: torch.Tensor, float_dtype: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {list(shape)} (log_prob is {list(ref.shape)})")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but log_prob is on {ref.device}")
    if float_dtype and x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but log_prob has {ref.dtype}; cast them to one float dtype")
    return x


def _check_finite(name: str, x: torch.Tensor) -> None:
    # Fast path: one reduction; NaN/inf propagate into the sum. Only a non-finite sum (a bad value,
    # or a legitimate fp overflow) pays for the element-wise scan.
    if bool(torch.isfinite(x.sum())):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan = int(torch.isnan(x).sum())
        raise ValueError(f"{name} contains {int(bad.sum())} non-finite values ({n_nan} NaN); "
                         "fill padding with finite numbers and check the producer of this tensor")


def _dense_groups(group_index: Union[torch.Tensor, Sequence[int]], batch: int, device: torch.device
                  ) -> tuple[torch.Tensor, int]:
    if not isinstance(group_index, torch.Tensor):
        try:
            group_index = torch.as_tensor(list(group_index), dtype=torch.int64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"group_index must be a [B] integer tensor or sequence of ints ({exc})") from None
    if group_index.dtype.is_floating_point or group_index.dtype.is_complex or group_index.dtype == torch.bool:
        raise ValueError(f"group_index must have an integer dtype, got {group_index.dtype}")
    if tuple(group_index.shape) != (batch,):
        raise ValueError(f"group_index has shape {tuple(group_index.shape)}, expected [{batch}] (one id per row)")
    if group_index.device != device:
        raise ValueError(f"group_index is on {group_index.device} but log_prob is on {device}")
    uniq, dense = torch.unique(group_index, return_inverse=True)
    return dense.to(torch.int64), int(uniq.numel())


def _sequence_advantages(adv: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor, loss_name: str) -> torch.Tensor:
    """[B, 1] one advantage per row; rejects rows whose valid tokens disagree; 0 for empty rows."""
    zero = torch.zeros((), dtype=adv.dtype, device=adv.device)
    if adv.shape[-1] == 1:
        seq = adv[:, 0]
    else:
        seq = masked_row_sum(adv, valid) / mask.sum(dim=-1).clamp(min=1)
        dev = torch.where(valid, (adv - seq.unsqueeze(-1)).abs(), zero).amax(dim=-1)
        bad = dev > _ADV_RTOL * (1.0 + seq.abs())
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten()[:5].tolist()
            raise ValueError(f"advantages vary along T within rows {rows}: loss '{loss_name}' is sequence-level and "
                             "needs one advantage per sequence (pass a [B] tensor or a row-constant [B, T] one)")
    # An empty row trains no token; zeroing its advantage keeps per-row reductions (GMPO) equal to
    # the reference, which averages A * mask over the row.
    return torch.where(valid.any(dim=-1), seq, zero).unsqueeze(-1)


def build_input(
    *,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is_weights: Optional[torch.Tensor] = None,
    group_index: Union[torch.Tensor, Sequence[int], None] = None,
    loss_agg_mode: Optional[str] = None,
    global_denominator: Optional[Denominator] = None,
    sequence_level: bool = False,
    needs_group: bool = False,
    loss_name: str = "loss",
) -> PolicyLossInput:
    """Validate raw loss arguments and return a :class:`PolicyLossInput`.

    ``sequence_level`` demands one advantage per row; ``needs_group`` demands ``group_index``.
    """
    if not isinstance(log_prob, torch.Tensor):
        raise ValueError(f"log_prob must be a torch.Tensor, got {type(log_prob).__name__}")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be [B, T], got shape {tuple(log_prob.shape)}")
    if not log_prob.dtype.is_floating_point:
        raise ValueError(f"log_prob must be a floating tensor, got {log_prob.dtype}")
    shape = tuple(log_prob.shape)
    batch = shape[0]
    _check_tensor("old_log_prob", old_log_prob, shape, log_prob, float_dtype=True)
    _check_tensor("response_mask", response_mask, shape, log_prob, float_dtype=False)
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.dim() == 1:
        _check_tensor("advantages", advantages, (batch,), log_prob, float_dtype=True)
        adv = advantages.unsqueeze(-1)
    else:
        adv = _check_tensor("advantages", advantages, shape, log_prob, float_dtype=True)
    if response_mask.dtype == torch.bool:
        valid = response_mask
    else:
        valid = response_mask != 0
        if not torch.equal(response_mask, valid.to(response_mask.dtype)):
            raise ValueError("response_mask must hold only 0 and 1 (or be bool)")
    mask = valid.to(log_prob.dtype)
    _check_finite("log_prob", log_prob.detach())
    _check_finite("old_log_prob", old_log_prob)
    _check_finite("advantages", advantages)

    if rollout_is_weights is not None:
        _check_tensor("rollout_is_weights", rollout_is_weights, shape, log_prob, float_dtype=True)
        _check_finite("rollout_is_weights", rollout_is_weights)
        if bool((rollout_is_weights < 0).any()):
            raise ValueError("rollout_is_weights must be >= 0 (importance weights)")
        rollout_is_weights = rollout_is_weights.detach()

    dense, num_groups = (None, 0)
    if group_index is not None:
        dense, num_groups = _dense_groups(group_index, batch, log_prob.device)
    elif needs_group:
        raise ValueError(f"loss '{loss_name}' normalises within prompt groups: pass group_index ([B] ints)")

    if sequence_level:
        adv = _sequence_advantages(adv, valid, mask, loss_name)
    return PolicyLossInput(
        log_prob=log_prob, old_log_prob=old_log_prob, advantages=adv, mask=mask, valid=valid,
        rollout_is_weights=rollout_is_weights, group_index=dense, num_groups=num_groups,
        loss_agg_mode=loss_agg_mode, global_denominator=global_denominator,
    )
