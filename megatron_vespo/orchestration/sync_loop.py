"""The RL loop, synchronous with staleness N (the paper's off-policy setting)::

    for it in 1..num_rollouts:
        samples = collect_rollout(engines, prompts)        # rank 0: tokens, mu log-probs, routes, reward
        batch   = collate(samples)                         # buffer: group advantages, padding
        actor.train_on_rollout(batch)                      # all ranks: old log-probs once, N updates
        weight_sync.update(actor, version + 1, engines)    # disk / broadcast / CUDA IPC (weight_sync.kind)
        evaluate(engines) every loop.eval_every rollouts   # held-out avg@k / pass@k, best policy kept
        checkpointer.maybe_save(it, ...)

N = train.rollout_batch_size / train.mini_batch_size updates consume each rollout batch, so the
k-th update trains on data k - 1 updates stale. Every training rank runs this function (under
``torchrun`` or as one process); rank 0 also drives the rollout engines and broadcasts the
batch. Metrics go to ``<loop.output_dir>/metrics.jsonl`` (one row per optimizer update and one
per rollout) and to wandb when enabled.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING

from megatron_vespo.checkpoint.faults import fault_point
from megatron_vespo.config.job import JobConfig

if TYPE_CHECKING:
    from megatron_vespo.data import PromptDataset
    from megatron_vespo.rewards import RewardFn
    from megatron_vespo.rollout.interfaces import Engines
    from megatron_vespo.types import TrainBatch

logger = logging.getLogger(__name__)


def run_sync(job: JobConfig) -> list[dict[str, float]]:
    """Run ``job.loop.num_rollouts`` rollout/train/sync iterations; returns rank 0's per-rollout metrics."""
    from megatron_vespo.orchestration.setup import prepare_loop, rank0_then_broadcast

    if job.loop.mode != "sync":
        raise ValueError(f"run_sync runs loop.mode=sync, got loop.mode={job.loop.mode}")
    s = prepare_loop(job)  # actor, resume, data set, reward, weight sync (shared with run_async)
    actor, dataset, sync, version, rank0 = s.actor, s.dataset, s.sync, s.version, s.rank0
    engines = s.start_engines()
    mlog = s.metrics_logger()
    history: list[dict[str, float]] = []
    try:
        for it in range(s.start + 1, job.loop.num_rollouts + 1):
            t0 = time.perf_counter()
            # every rank keeps rank 0's data position (it is saved in checkpoints)
            batch, data_state, rmetrics = rank0_then_broadcast(
                rank0, partial(_rollout, engines, dataset, job, s.reward_fn), f"rollout {it}", actor=actor)
            dataset.load_state_dict(data_state)
            t1 = time.perf_counter()
            updates = actor.train_on_rollout(batch)
            t2 = time.perf_counter()
            fault_point("trained", it)  # tests: kill -9 with the updates done, nothing synced or saved
            version += 1
            smetrics = sync.update(actor.model, version, engines)
            smetrics.update(s.evaluator.maybe_evaluate(it, engines, actor.model))  # held-out, loop.eval_every
            summary = s.log_iteration(mlog, it, version, updates, {**(rmetrics or {}), **smetrics}, t2 - t1,
                                      time.perf_counter() - t0)
            history.append(summary)
            if rank0:
                logger.info("rollout %d/%d: reward %.3f, loss %.4f, %.1fs", it, job.loop.num_rollouts,
                            summary.get("rollout/reward_mean", float("nan")), summary["train/loss_last"],
                            summary["time/iteration_s"])
            s.save(it, version, dataset.state_dict(), engines.router.state_dict() if rank0 else None)
            s.after_first_iteration(it, engines)  # loop.freeze_gc
    finally:
        s.gc_pauses.remove()
        mlog.close()
        sync.close(engines)
        if engines is not None:
            engines.stop()
    return history


def _rollout(engines: Engines, dataset: PromptDataset, job: JobConfig,
             reward_fn: RewardFn) -> tuple[TrainBatch, dict, dict]:
    """Rank 0: one rollout batch -> (collated batch, data position after it, rollout metrics)."""
    from megatron_vespo.buffer import collate
    from megatron_vespo.orchestration.collect import collect_rollout

    samples, metrics = collect_rollout(engines.router, engines.run, dataset, job.rollout,
                                       job.train.rollout_batch_size, reward_fn)
    return collate(samples), dataset.state_dict(), metrics
