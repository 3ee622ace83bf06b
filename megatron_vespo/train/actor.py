"""The Megatron-Core actor: old log-probs, then N optimizer updates per rollout batch.

::

    actor = MegatronActor(model_cfg, parallel, train_cfg, loss_cfg, routing_cfg)
    metrics = actor.train_on_rollout(batch)     # list of N dicts, one per optimizer update

``train_on_rollout`` (every rank passes the same full ``TrainBatch`` of
``train.rollout_batch_size`` rows):

1. old log-probs, once, before update 1: recomputed with the current weights
   (``train.old_log_prob_source=recompute``; routing R2 records here, R3 replays the engine's
   routes) or taken from ``batch.rollout_log_probs`` (``rollout``). With
   ``train.fuse_old_log_prob`` (default) the rows of mini-batch 1 skip that forward: update 1
   runs on the same weights, so their old log-probs are update 1's own log-probs, detached
   (importance ratio exactly 1, as verl computes them on-policy); the forward before update 1
   covers mini-batches 2..N only (none at N = 1);
2. for k = 1..N (N = rollout_batch_size / mini_batch_size): mini-batch k is split over DP
   ranks and micro-batches; each micro-batch loss is the registry loss with the mini-batch's
   ``global_denominator``, scaled by (micro-batches x DP size) to undo the schedule's
   micro-batch mean and DDP's gradient average, so the accumulated gradient is exactly the
   gradient of the registry loss on the whole mini-batch; then ``finalize_model_grads``,
   clipping, the optimizer step and the LR schedule step.

Update k therefore sees old log-probs from before update 1 (the paper's staleness N - 1 at
the last update). Metrics are computed on the whole mini-batch (``metrics.update_metrics``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional

import torch

from megatron_vespo.config.base import ConfigError
from megatron_vespo.fp8.config import FP8Config
from megatron_vespo.fp8.emulate import emulate_fp8
from megatron_vespo.fp8.te import check_fp8_job, fp8_alignment, fp8_overrides, fp8_summary
from megatron_vespo.losses import compute_policy_loss, compute_rollout_is_weights, get_loss, mini_batch_denominator
from megatron_vespo.losses.config import LossConfig
from megatron_vespo.models.config import ModelConfig
from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config, moe_layer_pattern
from megatron_vespo.routing.compact import validate_routes
from megatron_vespo.routing.config import RoutingReplayConfig
from megatron_vespo.routing.replay import RoutingReplay
from megatron_vespo.routing.routes import NO_ROUTE
from megatron_vespo.train import batching
from megatron_vespo.train.config import ParallelConfig, TrainConfig
from megatron_vespo.train.forward import forward_log_probs, run_schedule
from megatron_vespo.train.metrics import broadcast_from_last_stage, gather_rows, update_metrics
from megatron_vespo.train.mismatch import log_prob_mismatch, routing_agreement, routing_agreement_counts
from megatron_vespo.train.optim import build_optimizer, current_lr
from megatron_vespo.train.parallel import init_parallel
from megatron_vespo.types import TrainBatch

logger = logging.getLogger(__name__)


class MegatronActor:
    """Qwen3-MoE policy on Megatron-Core: log-probs and VESPO (or any registry loss) updates."""

    def __init__(self, model_cfg: ModelConfig, parallel: ParallelConfig, train: TrainConfig,
                 loss: LossConfig, routing: Optional[RoutingReplayConfig] = None, *, temperature: float = 1.0,
                 init: str = "megatron", hf_cfg: Any = None, fp8: Optional[FP8Config] = None) -> None:
        """Initialise parallel state (if needed), build the model, DDP, optimizer and routing replay.

        Args:
            temperature: sampling temperature of the rollout engine; log-probs are computed
                under softmax(logits / temperature) to score the distribution that sampled.
            init: "megatron" (Megatron's own random init) or "layout_invariant" (the same
                global random weights for every TP/EP/PP layout, ``models/init.py``). Load a
                checkpoint afterwards with ``checkpoint/`` for real runs.
            hf_cfg: a ready ``Qwen3MoeConfig`` (default: ``get_hf_config(model_cfg)``).
            fp8: FP8 settings (Transformer Engine, GPU only); passed to ``TransformerConfig``.
        """
        from megatron.core import parallel_state as ps

        if parallel.context_parallel_size > 1:
            raise ConfigError("parallel.context_parallel_size > 1 is not supported by the actor yet "
                              "(log-probs would need the CP sequence split undone)")
        self.model_cfg, self.parallel, self.train_cfg, self.loss_cfg = model_cfg, parallel, train, loss
        self.routing_cfg = routing or RoutingReplayConfig()
        self.temperature = 1.0 if temperature <= 0 else float(temperature)  # greedy rollouts: score at T=1
        get_loss(loss.name)  # unknown loss -> ValueError listing the known ones
        self.info = init_parallel(parallel, seed=model_cfg.seed)
        self.hf_cfg = hf_cfg if hf_cfg is not None else get_hf_config(model_cfg)
        self.moe_pattern = moe_layer_pattern(self.hf_cfg)
        batching.check_divisibility(train.mini_batch_size, train.micro_batch_size, self.info.dp_size)
        replay = self.routing_cfg.mode != "disabled"
        if replay and not any(self.moe_pattern):
            raise ConfigError(f"routing.mode={self.routing_cfg.mode} but the model has no MoE layer")
        check_fp8_job(fp8, model_cfg, parallel, self.hf_cfg)  # before the machine check: config errors first
        layers_per_stage = self.hf_cfg.num_hidden_layers // parallel.pipeline_model_parallel_size
        overrides = {**fp8_overrides(fp8), **model_cfg.transformer_overrides,
                     **model_cfg.recompute_fields(layers_per_stage)}
        chunk = build_gpt_model(self.hf_cfg, parallel, params_dtype=model_cfg.params_dtype, routing_replay=replay,
                                **overrides)
        emulate_fp8(chunk, fp8)  # fp8.emulate=true: quantise-dequantise GEMMs on CPU (fp8/emulate.py); else no-op
        if init == "layout_invariant":
            from megatron_vespo.models.init import init_layout_invariant_

            init_layout_invariant_(chunk, seed=model_cfg.seed, std=float(getattr(self.hf_cfg, "initializer_range",
                                                                                   0.02)))
        elif init != "megatron":
            raise ValueError(f"init must be 'megatron' or 'layout_invariant', got {init!r}")
        self.bundle = build_optimizer([chunk], train, parallel, self.info.dp_size, fp8=fp8)
        self.model = self.bundle.model
        self.optimizer, self.scheduler = self.bundle.optimizer, self.bundle.scheduler
        self.routing = None
        if replay:
            self.routing = RoutingReplay(self.model, self.moe_pattern, topk=self.hf_cfg.num_experts_per_tok,
                                         tp_rank=self.info.tp_rank, tp_size=self.info.tp_size,
                                         sequence_parallel=parallel.sequence_parallel,
                                         tp_group=ps.get_tensor_model_parallel_group())
        self.dp_group = ps.get_data_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        # sequence parallel splits the sequence over TP ranks; FP8 GEMMs need token counts that are
        # multiples of 16 (32 for MXFP8) on every rank
        self.seq_multiple = (self.info.tp_size if parallel.sequence_parallel else 1) * fp8_alignment(fp8)
        self.fp8_info = fp8_summary(chunk.config, self.model)  # what FP8 the run uses (log / run record)
        if self.fp8_info["fp8/enabled"]:
            logger.info("FP8: %s", self.fp8_info)
        self.updates = 0

    # ------------------------------------------------------------------ helpers
    def _micro_batches(self, batch: TrainBatch, rows: torch.Tensor, micro_batch_size: int,
                       old_log_prob: Optional[torch.Tensor] = None,
                       routes: Optional[torch.Tensor] = None,
                       is_weights: Optional[torch.Tensor] = None) -> list[batching.MicroBatch]:
        return batching.rank_micro_batches(
            batch, rows, dp_rank=self.info.dp_rank, dp_size=self.info.dp_size, micro_batch_size=micro_batch_size,
            seq_multiple=self.seq_multiple, device=self.info.device, old_log_prob=old_log_prob, routes=routes,
            is_weights=is_weights)

    def validate_batch(self, batch: TrainBatch) -> None:
        """Raise ValueError naming the field when ``train_on_rollout`` cannot train on ``batch``.

        ``batch.routed_experts`` may be the full [B, S, L, K] tensor or this rank's
        ``RouteRows`` (``orchestration/batch_transfer.py``); only the rows held are checked.
        """
        self._validate(batch)

    def _validate(self, batch: TrainBatch) -> None:
        batching.validate_train_batch(batch, self.train_cfg.rollout_batch_size)
        if self.routing_cfg.mode == "R3":
            if batch.routed_experts is None:
                raise ValueError("routing.mode=R3 needs TrainBatch.routed_experts (rollout.return_routed_experts)")
            validate_routes(batch.routed_experts, batch.attention_lengths,
                            num_moe_layers=sum(self.moe_pattern), topk=self.hf_cfg.num_experts_per_tok,
                            num_experts=self.hf_cfg.num_experts)
        if self.train_cfg.old_log_prob_source == "rollout" and batch.rollout_log_probs is None:
            raise ValueError("train.old_log_prob_source=rollout needs TrainBatch.rollout_log_probs")

    def _routing_phase(self, mode: str) -> str:
        if self.routing is None:
            return "disabled"
        if mode == "record":
            self.routing.start_record()
        else:
            self.routing.start_replay()
        return mode

    # ------------------------------------------------------------------ public API
    def compute_log_probs(self, batch: TrainBatch, *, with_entropy: bool = False,
                          routes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Log-probs (and entropy) [B, S] of every token of ``batch`` under the current weights.

        Same on every rank. Position s holds log pi(token s | < s); column 0 is 0. With
        routing R3 the batch routes are replayed; pass ``routes`` ([B, S, L, K]) to replay
        others (e.g. R2 records).
        """
        batching.validate_train_batch(batch)
        return self._log_prob_pass(batch, with_entropy=with_entropy, routes=routes, record=False)[:2]

    def _log_prob_pass(self, batch: TrainBatch, *, with_entropy: bool, routes: Optional[torch.Tensor],
                       record: bool, first_mini: int = 0
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        b, s = batch.tokens.shape
        mini = min(self.train_cfg.mini_batch_size, b)
        if b % mini:
            raise ValueError(f"batch of {b} rows is not a multiple of train.mini_batch_size ({mini})")
        mode = "disabled"
        if self.routing is not None:
            if record:
                mode = self._routing_phase("record")
            elif routes is not None or self.routing_cfg.mode == "R3":
                mode = self._routing_phase("R3" if routes is None else "R2")
        out = []
        try:
            # one schedule call per mini-batch: all micro-batches of a call share one length
            # (pipeline p2p shapes), and a rank walks exactly the rows it will train on
            for k in range(first_mini, b // mini):  # rows of mini-batches before first_mini stay 0
                mbs = self._micro_batches(batch, batching.mini_batch_rows(b, mini, k),
                                          self.train_cfg.micro_batch_size, routes=routes)
                out += forward_log_probs(self.model, mbs, temperature=self.temperature, with_entropy=with_entropy,
                                         routing=self.routing, routing_mode=mode)
            recorded = self.routing.collect_records(b, s) if mode == "record" else None
        finally:
            if mode != "disabled":
                self.routing.finish()
        kw = dict(dp_group=self.dp_group, pp_group=self.pp_group, pp_last_rank=self.pp_last_rank,
                  is_last_stage=self.is_last_stage, device=self.info.device)
        log_prob = gather_rows([(r, lp) for r, lp, _ in out], b, s, **kw)
        entropy = gather_rows([(r, e) for r, _, e in out], b, s, **kw) if with_entropy else None
        return log_prob, entropy, recorded

    def train_on_rollout(self, batch: TrainBatch) -> list[dict[str, float]]:
        """Consume one rollout batch in N optimizer updates; returns one metrics dict per update."""
        self._validate(batch)
        tc = self.train_cfg
        b, s = batch.tokens.shape
        t0 = time.perf_counter()
        routes = batch.routed_experts if self.routing_cfg.mode == "R3" else None
        fuse = self.fuses_old_log_prob
        if tc.old_log_prob_source == "recompute" or self.routing_cfg.mode == "R2":
            old, _, recorded = self._log_prob_pass(batch, with_entropy=False, routes=None,
                                                   record=self.routing_cfg.mode == "R2", first_mini=int(fuse))
            if self.routing_cfg.mode == "R2":
                routes = recorded
        diagnostics: dict[str, float] = {}
        if tc.old_log_prob_source == "recompute" and batch.rollout_log_probs is not None and not fuse:
            diagnostics.update(log_prob_mismatch(old * batch.loss_mask, batch.rollout_log_probs.float(),
                                                 batch.loss_mask))
        if self.routing_cfg.mode == "R2" and batch.routed_experts is not None:
            diagnostics.update(self._routing_drift(recorded, batch.routed_experts))
        if tc.old_log_prob_source == "rollout":
            old = batch.rollout_log_probs.float()
        old = old * batch.loss_mask  # only response positions carry a log-prob
        old_time = time.perf_counter() - t0
        mask = batch.loss_mask.float()
        is_weights = None
        rollout_is_metrics: dict[str, float] = {}
        if self.loss_cfg.rollout_is.enabled:
            if batch.rollout_log_probs is None:
                raise ValueError("loss.rollout_is.enabled needs TrainBatch.rollout_log_probs")
            res = compute_rollout_is_weights(old, batch.rollout_log_probs.float(), mask, self.loss_cfg.rollout_is)
            is_weights, mask = res.weights, mask * res.mask
            rollout_is_metrics = res.metrics
        results = []
        for k in range(tc.staleness):
            rows = batching.mini_batch_rows(b, tc.mini_batch_size, k)
            metrics = self._update(batch, rows, old, mask, is_weights, routes, fused_old=fuse and k == 0)
            if fuse and k == 0 and batch.rollout_log_probs is not None:
                # mini-batch 1's old log-probs exist only now (filled in by _update)
                diagnostics.update(log_prob_mismatch(old, batch.rollout_log_probs.float(), batch.loss_mask))
            metrics.update(rollout_is_metrics)
            metrics.update(diagnostics)
            metrics["time/old_log_prob_s"] = old_time
            metrics["update"] = float(k)
            results.append(metrics)
        return results

    def before_param_update(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn()`` right before any optimizer step writes the parameters; returns the remover.

        Hooked on the torch optimizers inside Megatron's (``register_step_pre_hook``), so it runs
        after the forward, backward and gradient clipping of an update and before its first
        parameter write: a background reader of the weights (the async loop's weight staging)
        can use the whole forward-backward and be waited for only here.
        """
        inner = [o.optimizer for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]
        handles = [opt.register_step_pre_hook(lambda *_: fn()) for opt in inner]
        return lambda: [h.remove() for h in handles]

    @property
    def fuses_old_log_prob(self) -> bool:
        """Whether update 1 supplies its own rows' old log-probs (``train.fuse_old_log_prob``).

        Needs recomputed old log-probs, and neither R2 (its record hooks count one forward per
        micro-batch, which a training pass with activation recompute would break) nor rollout
        IS correction (its weights need every old log-prob before update 1).
        """
        tc = self.train_cfg
        return (tc.fuse_old_log_prob and tc.old_log_prob_source == "recompute" and self.routing_cfg.mode != "R2"
                and not self.loss_cfg.rollout_is.enabled)

    def _routing_drift(self, recorded: torch.Tensor, rollout_routes: torch.Tensor) -> dict[str, float]:
        """Agreement of the trainer's own routing (R2 record) with the rollout engine's, summed over ranks."""
        # Only the rows this rank recorded can count (NO_ROUTE elsewhere), in chunks: the comparison
        # is [rows, S, L, K, K], which for a whole rollout batch of a 48-layer top-8 model is GBs.
        mine = (recorded[..., 0] != NO_ROUTE).flatten(1).any(-1).nonzero().flatten()
        counts = torch.zeros(3, dtype=torch.float64)
        for idx in mine.split(4):
            counts += routing_agreement_counts(recorded[idx], rollout_routes[idx].long())
        counts = counts.to(self.info.device)
        if torch.distributed.get_world_size() > 1:  # TP ranks count the same rows: ratios are unaffected
            torch.distributed.all_reduce(counts)
        return routing_agreement(counts.cpu(), self.hf_cfg.num_experts_per_tok)

    # ------------------------------------------------------------------ one optimizer update
    def _update(self, batch: TrainBatch, rows: torch.Tensor, old: torch.Tensor, mask: torch.Tensor,
                is_weights: Optional[torch.Tensor], routes: Optional[torch.Tensor],
                fused_old: bool = False) -> dict[str, float]:
        """One optimizer update on mini-batch ``rows``.

        ``fused_old``: the weights are those of the old log-probs, so the loss takes them from
        this forward (detached); ``old[rows]`` is filled in place before the metrics.
        """
        tc, lc = self.train_cfg, self.loss_cfg
        t0 = time.perf_counter()
        sub = TrainBatch(tokens=batch.tokens, loss_mask=mask, attention_lengths=batch.attention_lengths,
                         advantages=batch.advantages, routed_experts=routes, group_index=batch.group_index)
        mbs = self._micro_batches(sub, rows, tc.micro_batch_size, old_log_prob=old, routes=routes,
                                  is_weights=is_weights)
        spec = get_loss(lc.name)
        if spec.reduction == "groups":
            all_mbs = []
            no_routes = dataclasses.replace(sub, routed_experts=None)  # other ranks' routes are not held here
            for d in range(self.info.dp_size):
                all_mbs += batching.rank_micro_batches(no_routes, rows, dp_rank=d, dp_size=self.info.dp_size,
                                                       micro_batch_size=tc.micro_batch_size)
            batching.check_groups_whole(batch.group_index, all_mbs, lc.name)
        gi = None if batch.group_index is None else batch.group_index[rows]
        denom = mini_batch_denominator(lc.name, mask[rows], loss_agg_mode=lc.loss_agg_mode, group_index=gi)
        scale = float(len(mbs) * self.info.dp_size)

        def callback(mb: batching.MicroBatch, lp: torch.Tensor, ent: Optional[torch.Tensor]) -> tuple:
            old_lp = lp.detach() * mb.loss_mask if fused_old else mb.old_log_prob
            loss, loss_metrics = compute_policy_loss(
                lc.name, log_prob=lp, old_log_prob=old_lp, advantages=mb.advantages,
                response_mask=mb.loss_mask, loss_agg_mode=lc.loss_agg_mode,
                rollout_is_weights=mb.is_weights,
                group_index=mb.group_index if spec.needs_group else None, global_denominator=denom, **lc.params)
            # the schedule divides in place: keep a clone for reporting
            return loss * scale, (mb.rows, lp.detach(), None if ent is None else ent.detach(), loss.detach().clone(),
                                  loss_metrics)

        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        mode = self._routing_phase(self.routing_cfg.mode) if self.routing is not None else "disabled"
        try:
            stashes = run_schedule(self.model, mbs, callback, forward_only=False, temperature=self.temperature,
                                   with_entropy=True, routing=self.routing, routing_mode=mode)
        finally:
            if self.routing is not None:
                self.routing.finish()
        lr = current_lr(self.optimizer)  # the rate this step uses; the scheduler moves it afterwards
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        self.updates += 1
        elapsed = time.perf_counter() - t0
        if fused_old:
            lp_all = gather_rows([(r, x) for r, x, *_ in stashes], *batch.tokens.shape, dp_group=self.dp_group,
                                 pp_group=self.pp_group, pp_last_rank=self.pp_last_rank,
                                 is_last_stage=self.is_last_stage, device=self.info.device)
            old[rows] = lp_all[rows] * batch.loss_mask[rows]
        metrics = self._report(batch, rows, old, mask, is_weights, stashes, denom, grad_norm, ok, elapsed)
        metrics["lr"] = lr
        if self.routing is not None:
            metrics["routing/replayed_forwards"] = float(self.routing.last_counts[0])
            metrics["routing/replayed_recomputes"] = float(self.routing.last_counts[1])
        return metrics

    def _report(self, batch: TrainBatch, rows: torch.Tensor, old: torch.Tensor, mask: torch.Tensor,
                is_weights: Optional[torch.Tensor], stashes: list, denom: float, grad_norm: Any, ok: bool,
                elapsed: float) -> dict[str, float]:
        b, s = batch.tokens.shape
        kw = dict(dp_group=self.dp_group, pp_group=self.pp_group, pp_last_rank=self.pp_last_rank,
                  is_last_stage=self.is_last_stage, device=self.info.device)
        lp = gather_rows([(r, x) for r, x, *_ in stashes], b, s, **kw)[rows]
        ent = gather_rows([(r, e) for r, _, e, *_ in stashes], b, s, **kw)[rows]
        micro_sum = torch.tensor([float(sum(float(x[3]) for x in stashes))], device=self.info.device)
        if self.is_last_stage and torch.distributed.get_world_size(self.dp_group) > 1:
            torch.distributed.all_reduce(micro_sum, group=self.dp_group)
        metrics: dict[str, float] = {}
        if self.is_last_stage:
            lc = self.loss_cfg
            # one micro-batch on one data-parallel rank: its loss call already saw the whole mini-batch
            # (same rows, same denominator), so its metrics are the mini-batch's and are not computed twice
            whole = len(stashes) == 1 and self.info.dp_size == 1 and int(stashes[0][0].numel()) == int(rows.numel())
            metrics = update_metrics(
                loss_metrics=stashes[0][4] if whole else None,
                loss_name=lc.name, loss_params=lc.params, loss_agg_mode=lc.loss_agg_mode, log_prob=lp,
                old_log_prob=old[rows], entropy=ent, advantages=batch.advantages[rows].float(), mask=mask[rows],
                rollout_is_weights=None if is_weights is None else is_weights[rows],
                group_index=None if batch.group_index is None else batch.group_index[rows],
                global_denominator=denom)
            metrics["loss/micro_batch_sum"] = float(micro_sum.cpu())
        metrics = broadcast_from_last_stage(metrics, self.pp_group, self.pp_last_rank)
        tokens = float(batch.attention_lengths[rows].sum())
        metrics.update({
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": float(ok),
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "time/update_s": elapsed,
            "optimizer_step": float(self.updates),
        })
        return metrics
