"""What the sync and the async loop share: actor, resume, data, reward, weight sync, engines, metrics.

``prepare_loop(job)`` runs on every training rank (it is collective: the actor, the resume and
the weight export are), in this order:

1. the Megatron actor; rank 0 writes ``<loop.output_dir>/config.yaml``;
2. resume (``checkpoint.load`` or an existing ``checkpoint.save_dir``), else the HF base
   model when ``model.hf_path`` is set; ``start`` iteration and policy ``version``;
3. the prompt data set at its saved position, the reward function, the weight sync of
   ``weight_sync.kind``;
4. ``serve_path``: what the engines start from -- the HF base model itself on a fresh start
   from it, otherwise (random init, resume) an export of the trainer's current weights.

Engines are started by ``LoopSetup.start_engines`` on rank 0 only, after everything that can
fail cheaply, so a config error never leaves an engine behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import torch

from megatron_vespo.config.base import ConfigError, dump_config
from megatron_vespo.config.job import JobConfig
from megatron_vespo.utils.gc_control import GcPauses, freeze_gc
from megatron_vespo.utils.interrupt import raise_if_interrupted
from megatron_vespo.utils.io import atomic_path

if TYPE_CHECKING:
    from megatron_vespo.checkpoint.checkpointer import Checkpointer
    from megatron_vespo.data import PromptDataset
    from megatron_vespo.evaluation.loop import LoopEvaluator
    from megatron_vespo.observability import MetricsLogger
    from megatron_vespo.orchestration.engines import RolloutEngines
    from megatron_vespo.rewards import RewardFn
    from megatron_vespo.train.interfaces import Actor
    from megatron_vespo.weight_sync.factory import EngineWeightSync

__all__ = ["LoopSetup", "broadcast_from_rank0", "load_tokenizer", "prepare_loop", "raise_if_interrupted",
           "rank0_then_broadcast", "run_on_rank0"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def run_on_rank0(rank0: bool, fn: Callable[[], T], what: str) -> tuple[Optional[T], Optional[str]]:
    """Rank 0: ``(fn(), None)``, or ``(None, error)`` when ``fn`` raised; other ranks: ``(None, None)``.

    The error (``"<what>: <Type>: <message>"``) is logged here with its traceback and meant for
    :func:`broadcast_from_rank0`, which raises it on every rank, so no rank waits alone in a
    collective. Ctrl-C is never turned into an error: it propagates, also when a library wrapped it
    (:func:`raise_if_interrupted`).
    """
    if not rank0:
        return None, None
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - raised on every rank by the broadcast that follows
        raise_if_interrupted(exc)
        logger.exception("%s failed", what)
        return None, f"{what}: {type(exc).__name__}: {exc}"


def rank0_then_broadcast(rank0: bool, fn: Callable[[], tuple[Any, Optional[dict], Any]], what: str, *,
                         actor: Optional[Actor] = None, error: Optional[str] = None) -> tuple[Any, dict, Any]:
    """Collective: rank 0 runs ``fn() -> (batch, data_state, local)``; every rank gets the batch and data state.

    When ``fn`` fails its error is raised on every rank (:func:`run_on_rank0`,
    :func:`broadcast_from_rank0`); an ``error`` already recorded on rank 0 (an earlier
    :func:`run_on_rank0`) skips ``fn`` and is broadcast instead. ``local`` (metrics, say) stays on
    rank 0: None elsewhere. ``actor``: as in :func:`broadcast_from_rank0`.
    """
    out = None
    if error is None:
        out, error = run_on_rank0(rank0, fn, what)
    batch, data_state, local = out if out is not None else (None, None, None)
    batch, data_state = broadcast_from_rank0(batch, data_state, error, actor=actor)
    return batch, data_state, local


def broadcast_from_rank0(batch: Any, data_state: Optional[dict], error: Optional[str], *, actor: Optional[Actor] = None,
                         layout: Any = None) -> tuple[Any, dict]:
    """Send rank 0's batch and data position (or its error) to every rank; raise everywhere if rank 0 failed.

    The batch travels as tensors with compact routes (``orchestration/batch_transfer.py``); with
    ``actor`` (or an explicit ``BatchLayout``) each data-parallel rank receives only the routes
    of the rows it trains on, and rank 0 validates the whole batch with the actor first.
    """
    from megatron_vespo.orchestration.batch_transfer import BatchLayout, broadcast_batch

    if layout is None and actor is not None:
        layout = BatchLayout.from_actor(actor)
    return broadcast_batch(batch, data_state, error, layout,
                           validate=None if actor is None else actor.validate_batch)


def load_tokenizer(hf_path: Optional[str]) -> Any:
    """The HF tokenizer of ``hf_path`` when it ships tokenizer files, else None (synthetic data)."""
    if hf_path is None or not any((Path(hf_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_path)


@dataclass
class LoopSetup:
    """Everything a loop needs before its first iteration (see the module docstring)."""

    job: JobConfig
    out: Path
    actor: Actor
    ckpt: Checkpointer
    state: Optional[dict]
    start: int
    version: int
    dataset: PromptDataset
    reward_fn: RewardFn
    sync: EngineWeightSync
    serve_path: str
    rank0: bool
    evaluator: Optional[LoopEvaluator] = None
    gc_pauses: GcPauses = field(default_factory=lambda: GcPauses().install())

    def after_first_iteration(self, it: int, engines: Optional[RolloutEngines], worker: Any = None) -> None:
        """At the end of this process's first iteration (the warm-up), with ``loop.freeze_gc``: freeze
        the start-up heap here, in the engines (``/freeze_gc``, rank 0) and in the async rollout worker.

        An engine without the endpoint (an older SGLang) is logged and skipped: freezing is an
        optimisation, never a reason to stop the run.
        """
        if it != self.start + 1 or not self.job.loop.freeze_gc:
            return
        freeze_gc("the trainer")
        if not self.rank0:
            return
        if worker is not None:
            try:
                import ray

                ray.get(worker.freeze_gc.remote())
            except Exception as exc:  # noqa: BLE001 - an optimisation: log and go on
                logger.warning("rollout worker could not freeze its garbage collector: %s", exc)
        if engines is not None:
            try:
                engines.run(engines.router.broadcast(lambda c: c.freeze_gc()))
            except Exception as exc:  # noqa: BLE001 - e.g. an SGLang without /freeze_gc
                logger.warning("engines could not freeze their garbage collector: %s", exc)

    @property
    def data_state(self) -> dict:
        """The data position saved with the resumed checkpoint (empty on a fresh start)."""
        return dict((self.state or {}).get("data") or {})

    def start_engines(self, embedded_mode: Optional[str] = None) -> Optional[RolloutEngines]:
        """Rank 0: start (or attach to) the rollout engines on ``serve_path``, tagged with the current version.

        None on other ranks.
        """
        if not self.rank0:
            self.ckpt.reapply_rng()  # as rank 0 does below: every rank starts the loop from the saved streams
            return None
        from megatron_vespo.orchestration.engines import RolloutEngines

        engines = RolloutEngines(self.job.rollout, self.serve_path, log_dir=str(self.out / "rollout_logs"),
                                 embedded_mode=embedded_mode).start()
        if self.state and self.state.get("router"):  # resume: continue the seed / round-robin counters
            engines.router.load_state_dict(self.state["router"])
        self.ckpt.reapply_rng()  # starting the engines may have drawn from the restored RNG streams
        # engines start tagged "default": tag them with the trainer's version (a resumed run's too),
        # so samples carry the right policy version and lag arithmetic holds
        version = self.version
        engines.run(engines.router.broadcast(lambda c: c.update_weight_version(version)))
        return engines

    def metrics_logger(self) -> MetricsLogger:
        """``metrics.jsonl`` (+ wandb) writer, enabled on rank 0."""
        from megatron_vespo.observability import MetricsLogger

        # rows are stepped by optimizer update: a run resumed at iteration `start` continues after
        # start * staleness (a fresh run, start 0, moves an earlier run's file aside)
        return MetricsLogger(self.out, self.job.logging, enabled=self.rank0,
                             config_dump=self.job.model_dump(mode="json"),
                             start_step=self.start * self.job.train.staleness)

    def log_iteration(self, mlog: MetricsLogger, it: int, version: int, updates: list[dict], metrics: dict,
                      train_s: float, iteration_s: float) -> dict[str, float]:
        """Log one row per optimizer update and the rollout's summary row (shared by both loops); return it."""
        staleness = self.job.train.staleness
        for k, m in enumerate(updates):
            mlog.log(m, step=(it - 1) * staleness + k + 1)
        summary = {"rollout": float(it), "policy_version": float(version), **metrics, **self.gc_pauses.take(),
                   "time/train_s": train_s, "time/iteration_s": iteration_s,
                   "train/loss_last": updates[-1].get("loss", float("nan")),
                   "train/grad_norm_last": updates[-1].get("grad_norm", float("nan"))}
        mlog.log(summary, step=it * staleness)
        return summary

    def saves_state(self, iteration: int) -> bool:
        """Whether :meth:`save` writes a training checkpoint at ``iteration`` (the one that needs the data position)."""
        job = self.job
        return bool(job.checkpoint.save_dir) and (self.ckpt.due(iteration)[0] or iteration == job.loop.num_rollouts)

    def save(self, iteration: int, version: int, data_state: Optional[dict],
             router_state: Optional[dict] = None) -> None:
        """Collective: checkpoint what is due at ``iteration`` (always the last one when ``save_dir`` is set).

        The state is everything that shapes the rest of the run besides weights, optimizer,
        scheduler and RNG (saved by the checkpointer): policy version, data position, the
        router's seed counter (rank 0's; only rank 0 writes it) and the actor's update count.
        """
        job = self.job
        if data_state is None and self.saves_state(iteration):
            raise RuntimeError(f"rollout {iteration}: a checkpoint is due but no data position was read")
        state = {"policy_version": version, "data": data_state, "actor": {"updates": int(self.actor.updates)}}
        if router_state is not None:
            state["router"] = dict(router_state)
        if self.evaluator is not None:
            state["eval_best"] = self.evaluator.state_dict()
        self.ckpt.maybe_save(iteration, self.actor.model, self.actor.optimizer, self.actor.scheduler, state=state,
                             force=iteration == job.loop.num_rollouts and bool(job.checkpoint.save_dir))


def prepare_loop(job: JobConfig) -> LoopSetup:
    """Collective: build the actor, resume, data set, reward and weight sync (engines not started yet)."""
    from megatron_vespo.checkpoint.checkpointer import Checkpointer
    from megatron_vespo.data import PromptDataset
    from megatron_vespo.rewards import get_reward
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.weight_sync import build_weight_sync

    out = Path(job.loop.output_dir)
    if out.exists() and not out.is_dir():  # before the actor: minutes of setup otherwise, then mkdir fails
        raise ConfigError(f"loop.output_dir {out} exists and is not a directory")
    from megatron_vespo.data import check_context_length
    from megatron_vespo.models.qwen3_moe import get_hf_config

    source = f"model.hf_path {job.model.hf_path}" if job.model.hf_path else f"model.preset {job.model.preset}"
    check_context_length(job.data, job.rollout.sampling.max_new_tokens,  # before the actor and the engines
                         int(get_hf_config(job.model).max_position_embeddings), source)
    actor = MegatronActor(job.model, job.parallel, job.train, job.loss, job.routing,
                          temperature=job.rollout.sampling.temperature, fp8=job.fp8)
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        from megatron_vespo.checkpoint.training import remove_leftovers

        for d in (out, out / "weights"):  # what a killed run's atomic writes left (weight exports: model-sized)
            remove_leftovers(d)
        with atomic_path(out / "config.yaml") as fh:
            fh.write(dump_config(job))
    ckpt = Checkpointer(job.checkpoint, actor.hf_cfg, source_dir=job.model.hf_path)
    state = ckpt.resume(actor.model, actor.optimizer, actor.scheduler)
    if state is None and job.checkpoint.load is None and job.model.hf_path:
        ckpt.load_weights(actor.model, job.model.hf_path, actor.optimizer)  # fresh start from the HF base model
    start = int(state["iteration"]) if state else 0
    version = int((state or {}).get("policy_version", start))
    if state:  # optimizer_step in metrics continues (checkpoints before it was saved: start * N updates)
        actor.updates = int((state.get("actor") or {}).get("updates", start * job.train.staleness))
    tok = load_tokenizer(job.model.hf_path)
    dataset = PromptDataset.from_config(job.data, vocab_size=actor.hf_cfg.vocab_size,
                                        tokenize=None if tok is None else tok.encode)
    if state and state.get("data"):
        dataset.load_state_dict(state["data"])
    reward_fn = get_reward(job.data.reward)
    sync = build_weight_sync(job.weight_sync.kind, root=out / "weights", hf_cfg=actor.hf_cfg, cfg=job.weight_sync,
                             source_dir=job.model.hf_path, engine_tp_size=job.rollout.tp_size,
                             engine_ep_size=_engine_ep_size(job.rollout.server_args))
    fresh_hf = state is None and job.checkpoint.load is None and job.model.hf_path is not None
    fresh_hf = fresh_hf and job.weight_sync.dtype != "fp8"  # an FP8 engine starts from the FP8 export
    serve_path = job.model.hf_path if fresh_hf else str(sync.export(actor.model, version))
    from megatron_vespo.evaluation.loop import LoopEvaluator

    evaluator = LoopEvaluator(job, out, actor.hf_cfg, None if tok is None else tok.encode, rank0,
                              best=(state or {}).get("eval_best"))
    return LoopSetup(job=job, out=out, actor=actor, ckpt=ckpt, state=state, start=start, version=version,
                     dataset=dataset, reward_fn=reward_fn, sync=sync, serve_path=serve_path, rank0=rank0,
                     evaluator=evaluator)


def _engine_ep_size(server_args: dict) -> int:
    """SGLang's ``--ep-size`` (``ep_size`` / ``ep-size`` / ``expert_parallel_size``) in ``rollout.server_args``."""
    for key in ("ep_size", "ep-size", "expert_parallel_size", "expert-parallel-size"):
        if key in server_args:
            return int(server_args[key])
    return 1
