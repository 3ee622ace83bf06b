"""The policy-loss registry: ``name -> LossSpec`` and the one entry point ``compute_policy_loss``.

A loss is a function ``fn(x: PolicyLossInput, *, param=default, ...) -> (loss, metrics)``
registered with :func:`register_loss`; its keyword-only parameters (with defaults) are the
parameters users may set (``LossConfig.params``). ``metrics`` maps names to 0-d tensors
or numbers; :func:`compute_policy_loss` adds ``loss`` and turns them into python floats.

How a loss reduces to a scalar (``LossSpec.reduction``) decides what the micro-batch
``global_denominator`` counts (:func:`loss_denominator`):

* ``agg``: a [B, T] token loss reduced by ``aggregation.agg_loss`` with ``loss_agg_mode``
  (default per loss); D = valid tokens or non-empty rows, depending on the mode.
* ``rows``: one loss per sequence, mean over all B rows (GMPO, as verl's ``torch.mean``); D = rows.
* ``groups``: mean over prompt groups of the mean over their non-empty rows (GEPO); D = groups
  with at least one non-empty row. Groups must never be split between micro-batches.

A trainer holding the whole mini-batch calls :func:`mini_batch_denominator` once instead (it
also gives ``seq-mean-token-sum-norm`` its constant D, which is no count).
"""

from __future__ import annotations

import inspect
import logging
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from megatron_vespo.losses.aggregation import Denominator, check_agg_mode, local_denominator, whole_batch_denominator
from megatron_vespo.losses.inputs import PolicyLossInput, build_input
from megatron_vespo.losses.metrics import to_floats

logger = logging.getLogger(__name__)

LossFn = Callable[..., tuple[torch.Tensor, Mapping[str, Any]]]
REDUCTIONS = ("agg", "rows", "groups")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, parameter defaults and how it reduces.

    Attributes:
        name: registry key.
        fn: ``fn(x: PolicyLossInput, **params) -> (loss, metrics)``.
        params: accepted parameter names and their defaults.
        default_agg_mode: aggregation mode used when the caller passes none (``agg`` losses).
        reduction: ``agg``, ``rows`` or ``groups`` (module docstring).
        sequence_level: needs one advantage per sequence.
        needs_group: needs ``group_index``.
        call_statistics: the loss reshapes weights with a statistic of all the rows of one call
            (PSIS's tail fit, adaptive VESPO's scale), so micro-batch losses do not sum to the
            mini-batch loss; exact only when a call holds the whole mini-batch.
    """

    name: str
    fn: LossFn
    params: Mapping[str, Any]
    default_agg_mode: Optional[str]
    reduction: str
    sequence_level: bool
    needs_group: bool
    call_statistics: bool = False

    @property
    def summary(self) -> str:
        """First line of the loss function's docstring."""
        return (inspect.getdoc(self.fn) or "").splitlines()[0] if self.fn.__doc__ else ""

    def resolve_agg_mode(self, loss_agg_mode: Optional[str]) -> Optional[str]:
        """The aggregation mode a call uses; ValueError if the loss does not aggregate tokens."""
        if self.reduction != "agg":
            if loss_agg_mode is not None:
                raise ValueError(f"loss '{self.name}' reduces per {'sequence' if self.reduction == 'rows' else 'group'}"
                                 f" and ignores token aggregation: leave loss_agg_mode unset (got {loss_agg_mode!r})")
            return None
        return check_agg_mode(loss_agg_mode if loss_agg_mode is not None else self.default_agg_mode)

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validate parameter names and numeric types; returns them with defaults filled in."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            accepted = ", ".join(f"{k}={v!r}" for k, v in self.params.items()) or "none"
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for loss '{self.name}'; accepted: {accepted}")
        out = dict(self.params)
        for key, value in params.items():
            default = self.params[key]
            if isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise ValueError(f"parameter {key} of loss '{self.name}' must be a number, got {value!r}")
                value = float(value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"parameter {key} of loss '{self.name}' must be true/false, got {value!r}")
            elif default is None or isinstance(default, int):
                if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                    raise ValueError(f"parameter {key} of loss '{self.name}' must be an integer or null, got {value!r}")
            out[key] = value
        return out


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    default_agg_mode: Optional[str] = "token-mean",
    reduction: str = "agg",
    sequence_level: bool = False,
    needs_group: bool = False,
    call_statistics: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Decorator registering ``fn`` under ``name``; a duplicate name raises ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"loss name must be a non-empty string, got {name!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "agg":
        check_agg_mode(default_agg_mode, "default_agg_mode")
    elif default_agg_mode is not None:
        raise ValueError(f"loss '{name}' with reduction={reduction!r} must have default_agg_mode=None")

    def decorator(fn: LossFn) -> LossFn:
        if name in _REGISTRY:
            other = _REGISTRY[name].fn
            raise ValueError(f"loss '{name}' is already registered (by {other.__module__}.{other.__qualname__})")
        sig = inspect.signature(fn)
        params: dict[str, Any] = {}
        for p in list(sig.parameters.values())[1:]:
            if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
                raise ValueError(f"loss '{name}': parameter {p.name} must be keyword-only with a default")
            params[p.name] = p.default
        _REGISTRY[name] = LossSpec(name=name, fn=fn, params=params, default_agg_mode=default_agg_mode,
                                   reduction=reduction, sequence_level=sequence_level, needs_group=needs_group,
                                   call_statistics=call_statistics)
        return fn

    return decorator


def unregister_loss(name: str) -> None:
    """Remove a registered loss (for tests and plugins that re-register)."""
    get_loss(name)
    del _REGISTRY[name]


def available_losses() -> list[str]:
    """Sorted names of all registered losses."""
    return sorted(_REGISTRY)


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` registered as ``name``; ValueError listing the known names otherwise."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available_losses()) or 'none'}")
    return spec


def compute_policy_loss(
    name: str,
    *,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: Optional[str] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    group_index: Union[torch.Tensor, Sequence[int], None] = None,
    global_denominator: Optional[Denominator] = None,
    **params: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Compute the registered policy loss ``name``.

    Args:
        name: registered loss name (:func:`available_losses`).
        log_prob: [B, T] log pi_theta, carries the gradient.
        old_log_prob: [B, T] log-probs of the behaviour policy mu.
        advantages: [B] or [B, T] (row-constant for sequence-level losses).
        response_mask: [B, T] bool or 0/1.
        loss_agg_mode: aggregation mode (None = the loss's default; must be None for gmpo/gepo).
        rollout_is_weights: optional [B, T] detached TIS/MIS weights (``rollout_is.py``).
        group_index: [B] prompt-group ids (gepo, snis).
        global_denominator: mini-batch D for micro-batch splitting (:func:`loss_denominator`).
        **params: loss parameters (e.g. ``c1_pos`` for vespo); unknown names raise ValueError.

    Returns:
        (0-d loss tensor, dict of python floats including ``loss``).
    """
    spec = get_loss(name)
    kwargs = spec.check_params(params)
    mode = spec.resolve_agg_mode(loss_agg_mode)
    x: PolicyLossInput = build_input(
        log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages, response_mask=response_mask,
        rollout_is_weights=rollout_is_weights, group_index=group_index, loss_agg_mode=mode,
        global_denominator=global_denominator, sequence_level=spec.sequence_level,
        needs_group=spec.needs_group, loss_name=name,
    )
    loss, metrics = spec.fn(x, **kwargs)
    out = {"loss": loss.detach(), **metrics}
    return loss, to_floats(out)


def loss_denominator(
    name: str,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: Optional[str] = None,
    group_index: Union[torch.Tensor, Sequence[int], None] = None,
) -> float:
    """This micro-batch's additive share of ``global_denominator`` for loss ``name``.

    Sum it over the micro-batches of a mini-batch and all-reduce (SUM) it over DP ranks,
    then pass the total as ``global_denominator`` to every micro-batch call: the sum of the
    micro-batch losses then equals the loss of the whole mini-batch computed in one call.
    """
    spec = get_loss(name)
    mode = spec.resolve_agg_mode(loss_agg_mode)
    if spec.reduction == "agg":
        return local_denominator(response_mask, mode)
    if spec.reduction == "rows":
        return float(response_mask.shape[0])
    if group_index is None:
        raise ValueError(f"loss '{name}' averages over groups: pass group_index to count them")
    gi = torch.as_tensor(group_index)
    nonempty = (response_mask != 0).any(dim=-1) if response_mask.dtype != torch.bool else response_mask.any(dim=-1)
    return float(torch.unique(gi.to(nonempty.device)[nonempty]).numel())


def mini_batch_denominator(
    name: str,
    response_mask: torch.Tensor,
    *,
    loss_agg_mode: Optional[str] = None,
    group_index: Union[torch.Tensor, Sequence[int], None] = None,
) -> float:
    """``global_denominator`` of loss ``name`` for a whole mini-batch ``response_mask`` [M, T], floored at 1.

    For a trainer that holds every row of the mini-batch on every rank: the per-micro-batch
    shares of :func:`loss_denominator` summed in one call, and for ``seq-mean-token-sum-norm``
    (no additive count) the fixed length of :func:`aggregation.whole_batch_denominator`.
    """
    spec = get_loss(name)
    if spec.reduction == "agg":
        return whole_batch_denominator(response_mask, spec.resolve_agg_mode(loss_agg_mode))
    return max(loss_denominator(name, response_mask, loss_agg_mode=loss_agg_mode, group_index=group_index), 1.0)
