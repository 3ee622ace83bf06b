"""Routing replay (R2 / R3) on megatron-core's native ``RouterReplay``.

``TransformerConfig(moe_enable_routing_replay=True)`` gives every ``TopKRouter`` a
``RouterReplay`` whose RECORD action stores the chosen top-k indices and whose
REPLAY_FORWARD action routes to given indices while gathering the router's *own* scores at
them, so the router keeps receiving gradients (``transformer/moe/router_replay.py``).

:class:`RoutingReplay` drives those objects for one model, addressing the model's own
routers (megatron-core's class-level instance list is global to the process, so two models
would share it). Per micro-batch it queues one target per router; forward pre-hooks on the
routers hand the next target to ``RouterReplay`` and post-hooks check that the router's
routing map selects exactly those experts. With activation recomputation the same target
is queued again for the backward re-run (FIFO, so 1F1B pipeline order works too). After a
step, :meth:`finish` fails if any queued routing was not consumed (slime's habit).

* R2: :meth:`start_record` before the old-log-prob forward (the routers choose freely and
  record), :meth:`collect_records` turns the records into a [B, S, L, K] route tensor
  (all-gathered over TP under sequence parallelism); every update of that rollout batch
  replays it.
* R3: the routes come with the batch (``TrainBatch.routed_experts``, from the rollout
  engine) and are replayed in the old-log-prob forward and in every update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megatron_vespo.routing.routes import NO_ROUTE, replay_tensors

logger = logging.getLogger(__name__)


@dataclass
class _MicroBatchContext:
    rows: torch.Tensor  # [b] indices into the rollout batch
    seq_len: int


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def moe_routers(model_chunks: Sequence[torch.nn.Module], moe_pattern: Sequence[int]) -> list[tuple[int, Any]]:
    """(MoE-layer ordinal, TopKRouter) for every router of this rank's model chunks, in build order."""
    ordinal = {}
    for layer, is_moe in enumerate(moe_pattern):
        if is_moe:
            ordinal[layer] = len(ordinal)
    out = []
    for chunk in model_chunks:
        for layer in _unwrap(chunk).decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is None:
                continue
            gidx = int(layer.layer_number) - 1  # Megatron layer numbers are global and 1-based
            if gidx not in ordinal:
                raise ValueError(f"decoder layer {gidx} has a router but the model config marks it dense")
            out.append((ordinal[gidx], router))
    return out


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass (where checkpoints re-run forwards)."""
    return torch._C._current_graph_task_id() != -1


class RoutingReplay:
    """Record / replay MoE routing on one model (see module docstring)."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], moe_pattern: Sequence[int], *, topk: int,
                 tp_rank: int = 0, tp_size: int = 1, sequence_parallel: bool = False,
                 tp_group: Optional[object] = None):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._actions = RouterReplayAction
        self.routers = moe_routers(model_chunks, moe_pattern)
        self.layers = [o for o, _ in self.routers]
        self.num_moe_layers = int(sum(moe_pattern))
        # expert count, for spreading filler routes over all experts (routes.fill_unrouted)
        self.num_experts: Optional[int] = (int(self.routers[0][1].config.num_moe_experts) if self.routers
                                           else None)
        self.topk = topk
        self.tp_rank, self.tp_size, self.sp = tp_rank, tp_size, sequence_parallel
        self.tp_group = tp_group
        for _, r in self.routers:
            if getattr(r, "router_replay", None) is None:
                raise ValueError("routing replay needs routers built with moe_enable_routing_replay=True "
                                 "(build_gpt_model(..., routing_replay=True))")
            if getattr(r.config, "moe_router_fusion", False):
                raise ValueError("routing replay does not act on the fused TE router: set moe_router_fusion=False")
        self.phase: Optional[str] = None
        self._fwd: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._bwd: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._current: list[Optional[torch.Tensor]] = [None for _ in self.routers]
        self._records: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self._contexts: list[_MicroBatchContext] = []
        self.consumed = 0
        self.recomputed = 0
        self.last_counts = (0, 0)  # (forwards, recompute re-runs) replayed in the last finished phase
        self._hooks = []
        for i, (_, router) in enumerate(self.routers):
            self._hooks.append(router.register_forward_pre_hook(self._make_pre_hook(i)))
            self._hooks.append(router.register_forward_hook(self._make_post_hook(i)))

    # ---- phases ---------------------------------------------------------------------
    def start_record(self) -> None:
        """R2: routers choose freely and record; call :meth:`push_micro_batch` per micro-batch."""
        self._reset()
        self.phase = "record"
        for _, r in self.routers:
            r.router_replay.set_router_replay_action(self._actions.RECORD)

    def start_replay(self) -> None:
        """Routers follow the targets queued by :meth:`push_micro_batch`."""
        self._reset()
        self.phase = "replay"
        for _, r in self.routers:
            r.router_replay.set_router_replay_action(self._actions.REPLAY_FORWARD)

    def push_micro_batch(self, rows: torch.Tensor, routes: Optional[torch.Tensor] = None, *,
                         seq_len: Optional[int] = None) -> None:
        """Register the next micro-batch (call from the forward-step function, before the forward).

        Args:
            rows: [b] rollout-batch row indices of the micro-batch.
            routes: replay phase: [b, S, L, K] int64 filled routes (``routes.fill_unrouted``).
            seq_len: record phase: the micro-batch's (padded) sequence length S.
        """
        if self.phase == "record":
            if seq_len is None:
                raise ValueError("push_micro_batch in the record phase needs seq_len")
            self._contexts.append(_MicroBatchContext(rows=rows.clone(), seq_len=int(seq_len)))
        elif self.phase == "replay":
            if routes is None:
                raise ValueError("push_micro_batch in the replay phase needs routes")
            for i, t in enumerate(replay_tensors(routes, self.layers, tp_rank=self.tp_rank, tp_size=self.tp_size,
                                                 sequence_parallel=self.sp)):
                self._fwd[i].append(t)
        else:
            raise RuntimeError("call start_record() or start_replay() first")

    def collect_records(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """R2: the recorded routes as a [batch_size, seq_len, L, K] int64 tensor (``NO_ROUTE`` where none).

        Only this pipeline stage's MoE layers are filled (the others are never replayed here).
        """
        if self.phase != "record":
            raise RuntimeError("collect_records() outside the record phase")
        out = torch.full((batch_size, seq_len, self.num_moe_layers, self.topk), NO_ROUTE, dtype=torch.long)
        for i, (layer, _) in enumerate(self.routers):
            if len(self._records[i]) != len(self._contexts):
                raise RuntimeError(f"router of MoE layer {layer} recorded {len(self._records[i])} forwards for "
                                   f"{len(self._contexts)} micro-batches")
            for ctx, rec in zip(self._contexts, self._records[i]):
                b = ctx.rows.numel()
                local = rec.view(-1, b, self.topk)  # [S_local, b, K]
                if self.sp and self.tp_size > 1:
                    parts = [torch.empty_like(local) for _ in range(self.tp_size)]
                    torch.distributed.all_gather(parts, local.contiguous(), group=self.tp_group)
                    local = torch.cat(parts, dim=0)
                if local.shape[0] != ctx.seq_len:
                    raise RuntimeError(f"MoE layer {layer} recorded {local.shape[0]} positions for a micro-batch "
                                       f"of length {ctx.seq_len}")
                n = min(ctx.seq_len, seq_len)  # micro-batches padded past the batch width (FP8 multiples)
                out[ctx.rows, :n, layer] = local.transpose(0, 1)[:, :n].to("cpu", torch.long)
        self._records = [[] for _ in self.routers]
        self._contexts = []
        return out

    def finish(self) -> int:
        """End a phase: check every queued routing was consumed, clear state; returns forwards replayed."""
        left = [(self.routers[i][0], len(q)) for i, q in enumerate(self._fwd) if q]
        left_bwd = [(self.routers[i][0], len(q)) for i, q in enumerate(self._bwd) if q]
        consumed = self.consumed
        self.last_counts = (self.consumed, self.recomputed)
        self._reset()
        self.phase = None
        for _, r in self.routers:
            r.router_replay.clear_router_replay_action()
            r.router_replay.clear_indices()
        if left or left_bwd:
            raise RuntimeError(f"routing replay: routes queued but never used (MoE layer, count): forward {left}, "
                               f"recompute {left_bwd}; the forward did not run every micro-batch it was given")
        return consumed

    def remove(self) -> None:
        """Detach the hooks (the model keeps working without replay)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---- hooks ------------------------------------------------------------------------
    def _reset(self) -> None:
        self._fwd = [[] for _ in self.routers]
        self._bwd = [[] for _ in self.routers]
        self._current = [None for _ in self.routers]
        self._records = [[] for _ in self.routers]
        self._contexts = []
        self.consumed = 0
        self.recomputed = 0

    def _make_pre_hook(self, i: int):
        from megatron.core.tensor_parallel.random import is_checkpointing

        def hook(router: torch.nn.Module, args: tuple) -> None:
            if self.phase != "replay":
                return
            layer = self.routers[i][0]
            # Megatron's own checkpoint sets is_checkpointing(); Transformer Engine's te_checkpoint
            # (used instead under FP8/FP4) does not, so also recognise a re-run by autograd running it
            recompute_backward = torch.is_grad_enabled() and (is_checkpointing() or _in_backward())
            queue = self._bwd[i] if recompute_backward else self._fwd[i]
            if not queue:
                raise RuntimeError(f"routing replay: router of MoE layer {layer} ran a "
                                   f"{'recompute' if recompute_backward else 'forward'} with no routes queued")
            target = queue.pop(0)
            if recompute_backward:
                self.recomputed += 1
            if not torch.is_grad_enabled() and router.training:
                # a training-mode forward without autograd is the first pass of an activation
                # checkpoint (Megatron's or TE's): it will be re-run during backward
                self._bwd[i].append(target)
            hidden = args[0]
            tokens = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
            if target.shape != (tokens, self.topk):
                raise ValueError(f"routing replay: MoE layer {layer} routes {tokens} tokens but the replayed "
                                 f"routes are {tuple(target.shape)}, expected ({tokens}, {self.topk})")
            target = target.to(hidden.device)
            router.router_replay.target_topk_idx = target
            self._current[i] = target

        return hook

    def _make_post_hook(self, i: int):
        def hook(router: torch.nn.Module, args: tuple, output: Any) -> None:
            if self.phase == "record":
                rec = router.router_replay.get_recorded_indices()
                if rec is None:
                    raise RuntimeError(f"router of MoE layer {self.routers[i][0]} did not record its routing")
                self._records[i].append(rec.detach().clone())  # stays on the device until collected
            elif self.phase == "replay":
                routing_map = output[1]
                target = self._current[i]
                used = routing_map.gather(1, target).all() and bool((routing_map.sum(-1) == self.topk).all())
                if not used:
                    raise RuntimeError(f"routing replay: MoE layer {self.routers[i][0]} did not route to the "
                                       "replayed experts")
                self._current[i] = None
                self.consumed += 1

        return hook
