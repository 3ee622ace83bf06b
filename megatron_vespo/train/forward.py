"""Running micro-batches through Megatron's forward-backward schedule.

``run_schedule`` is the one place that calls ``get_forward_backward_func()`` (no pipelining,
or 1F1B / interleaved when PP > 1). Each micro-batch's forward step queues its routing-replay
targets, runs the ``GPTModel`` and hands the logits (last pipeline stage only) to a
callback that turns them into per-token log-probs and, for training, a loss.

Trap (megatron-core ``pipeline_parallel/schedules.py:269``): the schedule divides the
tensor the loss function returns *in place* by the number of micro-batches; anything kept
for reporting must be a detached clone.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch

from megatron_vespo.routing.replay import RoutingReplay
from megatron_vespo.routing.routes import fill_unrouted
from megatron_vespo.train.batching import MicroBatch
from megatron_vespo.train.logprobs import token_log_probs

#: callback(micro_batch, log_prob [b, S], entropy [b, S] or None) -> (loss to backprop, stash)
LossCallback = Callable[[MicroBatch, torch.Tensor, Optional[torch.Tensor]], tuple[torch.Tensor, Any]]


def _routes_for(mb: MicroBatch, routing_mode: str, layers: list[int],
                num_experts: Optional[int] = None) -> torch.Tensor:
    if mb.routed_experts is None:
        raise ValueError(f"routing replay {routing_mode}: no routes for micro-batch rows {mb.rows.tolist()}")
    if routing_mode == "R3":
        return fill_unrouted(mb.routed_experts, mb.attention_lengths.to(mb.routed_experts.device),
                             num_experts=num_experts)
    # R2 records only this pipeline stage's layers: check those, at the real tokens of each row
    lengths = mb.attention_lengths.to(mb.routed_experts.device)
    real = torch.arange(mb.routed_experts.shape[1], device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    missing = (mb.routed_experts[:, :, layers] < 0).flatten(2).any(-1) & real  # [b, S]
    if bool(missing.any()):
        b, s = (int(v) for v in missing.nonzero()[0])
        raise ValueError(f"routing replay R2: no recorded route for sample {int(mb.rows[b])} position {s}")
    # padding past the batch width (FP8 / SP multiples) was never recorded; any route serves it
    # (recorded padding routes are kept: the same expert batches keep the replay bit-exact)
    gap = ~real & (mb.routed_experts < 0).flatten(2).any(-1)
    if not bool(gap.any()):
        return mb.routed_experts
    out = mb.routed_experts.clone()
    out[gap] = fill_unrouted(mb.routed_experts, lengths, num_experts=num_experts)[gap]
    return out


def run_schedule(
    model: list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    callback: LossCallback,
    *,
    forward_only: bool,
    temperature: float = 1.0,
    with_entropy: bool = True,
    routing: Optional[RoutingReplay] = None,
    routing_mode: str = "disabled",
) -> list[Any]:
    """Run ``micro_batches`` through the schedule; returns the callback stashes (last PP stage, else []).

    ``routing_mode``: "record" (R2 record pass), "R2"/"R3" (replay the micro-batch routes) or
    "disabled". The caller starts/finishes the routing phase around this call.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    stashes: list[Any] = []

    def loss_func(mb: MicroBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
        log_prob, entropy = token_log_probs(output, mb.tokens, with_entropy=with_entropy, temperature=temperature)
        loss, stash = callback(mb, log_prob, entropy)
        stashes.append(stash)
        return loss, {}

    def forward_step(data_iterator: Any, chunk: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        mb: MicroBatch = next(data_iterator)
        if routing is not None:
            if routing_mode == "record":
                routing.push_micro_batch(mb.rows, seq_len=mb.seq_len)
            elif routing_mode in ("R2", "R3"):
                routing.push_micro_batch(mb.rows, routes=_routes_for(mb, routing_mode, routing.layers,
                                                                     routing.num_experts))
        output = chunk(mb.tokens, mb.position_ids, None)
        return output, partial(loss_func, mb)

    fb = get_forward_backward_func()
    n_chunks = len(model)
    data_iter: Any = iter(micro_batches) if n_chunks == 1 else [iter(micro_batches) for _ in range(n_chunks)]
    fb(
        forward_step_func=forward_step,
        data_iterator=data_iter,
        model=model if n_chunks > 1 else model[0],
        num_microbatches=len(micro_batches),
        seq_length=micro_batches[0].seq_len,
        micro_batch_size=int(micro_batches[0].tokens.shape[0]),
        forward_only=forward_only,
    )
    return stashes


def forward_log_probs(
    model: list[torch.nn.Module],
    micro_batches: list[MicroBatch],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    routing: Optional[RoutingReplay] = None,
    routing_mode: str = "disabled",
) -> list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """Forward-only pass: [(rows, log_prob [b, S], entropy or None)] per micro-batch (last PP stage).

    Runs in eval mode without autograd (so activation recomputation does not engage).
    """
    def callback(mb: MicroBatch, lp: torch.Tensor, ent: Optional[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        return lp.new_zeros(()), (mb.rows, lp.detach(), None if ent is None else ent.detach())

    modes = [m.training for m in model]
    for m in model:
        m.eval()
    try:
        with torch.no_grad():
            return run_schedule(model, micro_batches, callback, forward_only=True, temperature=temperature,
                                with_entropy=with_entropy, routing=routing, routing_mode=routing_mode)
    finally:
        for m, was_training in zip(model, modes):
            m.train(was_training)
