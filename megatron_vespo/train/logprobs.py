"""Per-token log-probs and entropy from (vocab-parallel) logits, aligned with ``TrainBatch``.

Alignment: the model's logits at position s predict token s + 1. ``TrainBatch.loss_mask[:, s]``
is the mask of *token* s, so we return ``log_prob[:, s] = log pi(tokens[:, s] | tokens[:, <s])``
for s >= 1 and 0 at s = 0 (no prediction for the first token). Right padding needs no
special handling under a causal mask: padded positions come after every real token.

Tensor parallelism: Megatron's output layer leaves the logits split over the vocabulary
([B, S, V / TP] on each TP rank; with sequence parallelism the sequence is gathered before
the output layer, so every TP rank sees all S positions). We compute the log-softmax and
the entropy without gathering the vocabulary:

    m      = max_v z_v                          (all-reduce MAX, no gradient needed)
    Z      = sum_v exp(z_v - m)                 (all-reduce SUM)
    log p  = z_y - m - log Z                    (z_y lives on one rank: masked gather + SUM)
    H      = log Z - sum_v p_v (z_v - m)        (all-reduce SUM)

The SUM all-reduces use Megatron's ``reduce_from_tensor_model_parallel_region`` (forward
all-reduce, backward identity), which is the correct gradient because everything after the
reduction is computed identically on every TP rank. ``temperature`` divides the logits
first, to score tokens under the distribution the rollout engine sampled from.
"""

from __future__ import annotations

from typing import Optional

import torch


def _tp_group_and_rank(tp_group: Optional[object]) -> tuple[Optional[object], int, int]:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None, 0, 1
    if tp_group is None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return None, 0, 1
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return tp_group, torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group)


def _sum_over_tp(x: torch.Tensor, group: Optional[object], size: int) -> torch.Tensor:
    if size == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    with_entropy: bool = True,
    temperature: float = 1.0,
    tp_group: Optional[object] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of ``targets`` and entropy under ``softmax(logits / temperature)``.

    Args:
        logits: [..., V_local] this TP rank's vocabulary shard (the full vocabulary at TP=1).
        targets: [...] int64 token ids in the *global* vocabulary.
        with_entropy: also return the entropy [...] (differentiable).
        temperature: > 0.
        tp_group: tensor-parallel group (default: Megatron's, or none if not initialised).

    Returns:
        (log_prob [...] float32, entropy [...] float32 or None). Both carry gradients.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on the "
                         "leading dimensions")
    group, rank, size = _tp_group_and_rank(tp_group)
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    v_local = z.shape[-1]
    with torch.no_grad():
        m = z.max(dim=-1).values
        if size > 1:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = z - m.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = _sum_over_tp(exp.sum(dim=-1), group, size)
    log_z = sum_exp.log()

    start = rank * v_local
    in_shard = (targets >= start) & (targets < start + v_local)
    local_t = (targets - start).clamp(0, v_local - 1)
    picked = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_shard, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
    picked = _sum_over_tp(picked, group, size)
    log_prob = picked - log_z

    entropy = None
    if with_entropy:
        p_times_z = (exp * shifted).sum(dim=-1)
        entropy = log_z - _sum_over_tp(p_times_z, group, size) / sum_exp
    return log_prob, entropy


def token_log_probs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    with_entropy: bool = True,
    temperature: float = 1.0,
    tp_group: Optional[object] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs [B, S] aligned with ``tokens`` (position s = token s; column 0 is 0).

    Args:
        logits: [B, S, V_local] model output (vocab-parallel under TP).
        tokens: [B, S] input token ids.

    Returns:
        (log_prob [B, S], entropy [B, S] or None); entropy[:, s] is the entropy of the
        distribution token s was drawn from (position s - 1's prediction), 0 in column 0.
    """
    if logits.dim() != 3 or tokens.dim() != 2 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits must be [B, S, V] and tokens [B, S]; got {tuple(logits.shape)} and "
                         f"{tuple(tokens.shape)}")
    lp, ent = vocab_parallel_log_probs(logits[:, :-1], tokens[:, 1:], with_entropy=with_entropy,
                                       temperature=temperature, tp_group=tp_group)
    zero = lp.new_zeros(lp.shape[0], 1)
    lp = torch.cat([zero, lp], dim=1)
    if ent is not None:
        ent = torch.cat([zero, ent], dim=1)
    return lp, ent
