"""The RL loop, synchronous with staleness N (the paper's off-policy setting)::

    for it in 1..num_rollouts:
        samples = collect_rollout(engines, prompts)        # rank 0: tokens, mu log-probs, routes, reward
        batch   = collate(samples)                         # buffer: group advantages, padding
        actor.train_on_rollout(batch)                      # all ranks: old log-probs once, N updates
        weight_sync.update(actor, version + 1, engines)    # disk / broadcast / CUDA IPC (loop.weight_sync)
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
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_vespo.config.base import dump_config
from megatron_vespo.config.job import JobConfig
from megatron_vespo.utils.io import atomic_path

logger = logging.getLogger(__name__)


def _broadcast_batch(batch: Any, data_state: Optional[dict], error: Optional[str]) -> tuple[Any, dict]:
    """Send rank 0's batch and data position (or its error) to every rank; raise everywhere if rank 0 failed."""
    payload = [(batch, data_state, error)]
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(payload, src=0)
    batch, data_state, error = payload[0]
    if error is not None:
        raise RuntimeError(f"rollout failed on rank 0: {error}")
    return batch, data_state


def _tokenizer(hf_path: Optional[str]) -> Any:
    if hf_path is None or not any((Path(hf_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_path)


def run_sync(job: JobConfig) -> list[dict[str, float]]:
    """Run ``job.loop.num_rollouts`` rollout/train/sync iterations; returns rank 0's per-rollout metrics."""
    from megatron_vespo.buffer import collate
    from megatron_vespo.checkpoint.manager import Checkpointer
    from megatron_vespo.data import PromptDataset
    from megatron_vespo.observability import MetricsLogger
    from megatron_vespo.orchestration.collect import collect_rollout
    from megatron_vespo.orchestration.engines import RolloutEngines
    from megatron_vespo.rewards import get_reward
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.weight_sync import build_weight_sync

    if job.loop.mode != "sync":
        raise ValueError(f"run_sync runs loop.mode=sync, got loop.mode={job.loop.mode}")
    out = Path(job.loop.output_dir)
    actor = MegatronActor(job.model, job.parallel, job.train, job.loss, job.routing,
                          temperature=job.rollout.sampling.temperature)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "config.yaml") as fh:
            fh.write(dump_config(job))
    ckpt = Checkpointer(job.checkpoint, actor.hf_cfg, source_dir=job.model.hf_path)
    state = ckpt.resume(actor.model, actor.optimizer, actor.scheduler)
    if state is None and job.checkpoint.load is None and job.model.hf_path:
        Checkpointer._load_hf(actor.model, job.model.hf_path)  # fresh start from the HF base model
    start = int(state["iteration"]) if state else 0
    version = int((state or {}).get("policy_version", start))
    tok = _tokenizer(job.model.hf_path)
    dataset = PromptDataset.from_config(job.data, vocab_size=actor.hf_cfg.vocab_size,
                                        tokenize=None if tok is None else tok.encode)
    if state and state.get("data"):
        dataset.load_state_dict(state["data"])
    reward_fn = get_reward(job.data.reward)
    sync = build_weight_sync(job.loop.weight_sync, root=out / "weights", hf_cfg=actor.hf_cfg, cfg=job.weight_sync,
                             source_dir=job.model.hf_path, engine_tp_size=job.rollout.tp_size)
    fresh_hf = state is None and job.checkpoint.load is None and job.model.hf_path is not None
    # The engines must start from the trainer's weights: the HF base model itself on a fresh
    # start from it, otherwise (random init, resume) an export of the current weights.
    serve_path = job.model.hf_path if fresh_hf else str(sync.export(actor.model, version))
    engines = RolloutEngines(job.rollout, serve_path, log_dir=str(out / "rollout_logs")).start() if rank0 else None
    mlog = MetricsLogger(out, job.logging, enabled=rank0, config_dump=job.model_dump(mode="json"))
    history: list[dict[str, float]] = []
    try:
        for it in range(start + 1, job.loop.num_rollouts + 1):
            t0 = time.perf_counter()
            batch, error, rmetrics = None, None, {}
            if rank0:
                try:
                    samples, rmetrics = collect_rollout(engines.router, engines.run, dataset, job.rollout,
                                                        job.train.rollout_batch_size, reward_fn)
                    batch = collate(samples)
                except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                    error = f"{type(exc).__name__}: {exc}"
                    logger.exception("rollout %d failed", it)
            # every rank keeps rank 0's data position (it is saved in checkpoints)
            batch, data_state = _broadcast_batch(batch, dataset.state_dict() if rank0 else None, error)
            dataset.load_state_dict(data_state)
            t1 = time.perf_counter()
            updates = actor.train_on_rollout(batch)
            t2 = time.perf_counter()
            version += 1
            smetrics = sync.update(actor.model, version, engines)
            for k, m in enumerate(updates):
                mlog.log(m, step=(it - 1) * job.train.staleness + k + 1)
            summary = {"rollout": float(it), "policy_version": float(version), **rmetrics, **smetrics,
                       "time/train_s": t2 - t1, "time/iteration_s": time.perf_counter() - t0,
                       "train/loss_last": updates[-1].get("loss", float("nan")),
                       "train/grad_norm_last": updates[-1].get("grad_norm", float("nan"))}
            mlog.log(summary, step=it * job.train.staleness)
            history.append(summary)
            if rank0:
                logger.info("rollout %d/%d: reward %.3f, loss %.4f, %.1fs", it, job.loop.num_rollouts,
                            summary.get("rollout/reward_mean", float("nan")), summary["train/loss_last"],
                            summary["time/iteration_s"])
            ckpt.maybe_save(it, actor.model, actor.optimizer, actor.scheduler,
                            state={"policy_version": version, "data": dataset.state_dict()},
                            force=it == job.loop.num_rollouts and bool(job.checkpoint.save_dir))
    finally:
        mlog.close()
        sync.close(engines)
        if engines is not None:
            engines.stop()
    return history
