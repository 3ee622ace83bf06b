"""The fully asynchronous RL loop (``loop.mode=async``): generation never waits for training::

    rank 0 ── RolloutEngines (embedded processes / SGLang) ◄──HTTP── RolloutWorker (Ray actor)
                                                                    prompts ─► groups ─► GroupBuffer
    every training rank:                                            (bounded, tagged with versions)
    for it in start+1 .. num_rollouts:
        groups, stats = worker.take(B groups with lag <= L)  # rank 0; waits only when the buffer is short
        batch  = collate(groups) -> broadcast            # group advantages, padding
        actor.train_on_rollout(batch)                    # N updates; the worker keeps generating
        stats, data position = worker.snapshot()         # overlap metrics; what the checkpoint saves
        version += 1
        join the previous background load                # collective; its error raised on every rank
        export(version)                                  # collective (disk)
        rank 0, in the background (loop.overlap_weight_load):
            pause engines -> load(version) -> continue -> worker.set_version(version)
        (else the trainer waits for the same steps; any other weight_sync.kind: collective update)
        checkpoint (data position = data set + prompts not yet trained on)

B = train.rollout_batch_size / rollout.n_samples_per_prompt groups per batch, L =
``loop.max_policy_lag``. A sample is tagged with the version that generated its first token;
its policy lag is the trainer's version when the batch is taken minus that tag, never more
than L (``async_buffer``). Per-rollout metrics add the lag histogram, stale drops, buffer
fill, generation throughput, the time the trainer waited for data and how much of the
training time the engines were generating (``async/overlap_frac``: per engine, the time a
generate request was outstanding there, averaged over engines; docs/orchestration.md) and how
long the trainer waited for the previous background load (``time/weight_load_wait_s``;
``orchestration/weight_load.py`` has the argument why deferring the load keeps the lag exact).
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

from megatron_vespo.checkpoint.faults import fault_point
from megatron_vespo.config.base import ConfigError
from megatron_vespo.config.job import JobConfig
from megatron_vespo.orchestration.weight_load import BackgroundLoad, ParamsGate, PausedDiskLoad, deferred_update
from megatron_vespo.orchestration.weight_load import overlap_weight_load as resolve_overlap
from megatron_vespo.utils.imports import require

if TYPE_CHECKING:
    from megatron_vespo.orchestration.setup import LoopSetup
    from megatron_vespo.rollout.interfaces import Engines
    from megatron_vespo.weight_sync.factory import EngineWeightSync

logger = logging.getLogger(__name__)

#: what :func:`overlap_metrics` reports (every row carries them: NaN where nothing was measured)
OVERLAP_KEYS = ("async/gen_busy_during_train_s", "async/overlap_frac", "async/samples_generated_during_train")
POLL_S = 2.0  # one take() call waits at most this long, so errors and Ctrl-C surface quickly


def async_bounds(job: JobConfig) -> tuple[int, int, int]:
    """(groups per batch B, buffer capacity, max in-flight groups) of an async job; ConfigError names the key."""
    loop = job.loop
    groups = job.train.rollout_batch_size // job.rollout.n_samples_per_prompt
    buffer_groups = loop.buffer_groups or (loop.max_policy_lag + 1) * groups
    if buffer_groups < groups:
        raise ConfigError(f"loop.buffer_groups={buffer_groups} is smaller than one rollout batch ({groups} groups = "
                          "train.rollout_batch_size / rollout.n_samples_per_prompt): the trainer could never pull one")
    if loop.pause_mode == "in_place" and job.rollout.engine == "sglang" and job.weight_sync.kind != "disk":
        raise ConfigError(f"loop.pause_mode=in_place with weight_sync.kind={job.weight_sync.kind} on SGLang engines: "
                          "the update flushes the KV cache, which SGLang refuses while requests are paused in place; "
                          "use loop.pause_mode=abort or retract (or weight_sync.kind=disk)")
    return groups, buffer_groups, loop.max_inflight_groups or groups


def init_ray(ray: Any, address: Optional[str], num_cpus: int) -> None:
    """Join ``address`` (else ``$RAY_ADDRESS``), or start a local Ray with ``num_cpus`` CPUs."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        logger.info("joined the Ray cluster at %s", address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        logger.info("started a local Ray with %d CPUs", num_cpus)


def overlap_metrics(before: dict, after: dict) -> dict[str, float]:
    """From two worker ``stats`` snapshots bracketing a training step: how much generation overlapped it.

    ``async/gen_busy_during_train_s``: seconds each engine had a generate request of the worker
    outstanding between the snapshots, averaged over engines; ``async/overlap_frac``: that over the
    seconds between the snapshots (1.0 = every engine generated all through the step; NaN when the
    router measures no busy time). See docs/orchestration.md.
    """
    wall = max(after["clock_s"] - before["clock_s"], 1e-9)
    b, a = before.get("engine_busy_s") or [], after.get("engine_busy_s") or []
    if not a or len(a) != len(b):
        gen = float("nan")
    else:
        gen = sum(x - y for x, y in zip(a, b)) / len(a)
    return {"async/gen_busy_during_train_s": gen, "async/overlap_frac": gen / wall,
            "async/samples_generated_during_train": after["samples"] - before["samples"]}


def pull_groups(ray: Any, worker: Any, n_groups: int, version: int,
                ahead: Any = None) -> tuple[Any, dict, dict, Optional[int]]:
    """Rank 0: wait for ``n_groups`` usable groups -> (train batch, metrics with ``time/wait_s``, stats, batch id).

    The worker collates the batch (``take(collate_batch=True)``): only its tensors cross from
    the worker. ``ahead``: a ``take`` sent before the previous batch trained (its answer is
    usually there already); when it came back empty the groups are asked for again. Every take
    holds its batch as pending until the snapshot after its training (``RolloutWorker.snapshot``).
    """
    t0 = last_log = time.perf_counter()
    while True:
        res = ray.get(ahead) if ahead is not None else ray.get(
            worker.take.remote(n_groups, version, POLL_S, True, collate_batch=True))
        ahead = None
        if res.get("train_batch") is not None:
            return (res["train_batch"], {**res["metrics"], "time/wait_s": time.perf_counter() - t0},
                    res.get("stats", {}), res.get("batch"))
        if time.perf_counter() - last_log > 60:
            last_log = time.perf_counter()
            logger.warning("waited %.0fs for rollout data: %s", last_log - t0, res.get("stats"))


def update_engines(setup: LoopSetup, engines: Optional[Engines], version: int, pause_mode: str) -> dict[str, float]:
    """Collective: put ``version`` into the engines with generation paused around the load (rank 0 pauses)."""
    from megatron_vespo.orchestration.setup import rank0_then_broadcast

    model = setup.actor.model
    if setup.job.weight_sync.kind == "disk":
        view = PausedDiskLoad(engines, pause_mode) if engines is not None else None
        metrics = setup.sync.update(model, version, view)
        return {**metrics, "time/engines_paused_s": view.paused_s if view else 0.0}
    # broadcast / CUDA-IPC paths: the engines must not generate with half-updated weights
    t0 = time.perf_counter()
    rank0_then_broadcast(engines is not None,
                         lambda: (None, None, engines.run(engines.router.pause_generation(pause_mode))),
                         "pause_generation")
    try:
        metrics = setup.sync.update(model, version, engines)
    finally:
        if engines is not None:
            engines.run(engines.router.continue_generation())
    return {**metrics, "time/engines_paused_s": time.perf_counter() - t0 if engines is not None else 0.0}


def run_async(job: JobConfig) -> list[dict[str, float]]:
    """Run ``job.loop.num_rollouts`` iterations with concurrent generation; returns rank 0's per-rollout metrics."""
    if job.loop.mode != "async":
        raise ValueError(f"run_async runs loop.mode=async, got loop.mode={job.loop.mode}")
    ray = require("ray", "loop.mode=async (the rollout worker is a Ray actor)")
    n_groups, buffer_groups, inflight = async_bounds(job)
    overlap = resolve_overlap(job)  # ConfigError before any Megatron or engine work
    from megatron_vespo.orchestration.rollout_worker import spawn_worker
    from megatron_vespo.orchestration.setup import prepare_loop, rank0_then_broadcast, run_on_rank0

    s = prepare_loop(job)
    L, version, rank0 = job.loop.max_policy_lag, s.version, s.rank0
    engines = worker = mlog = None
    ray_started = False
    # one process, tensor path: the staging reads the weights in the background job too, and the
    # next optimizer step waits for it (weight_load.ParamsGate)
    gate = ParamsGate() if overlap and job.weight_sync.kind == "tensor" and hasattr(s.actor, "before_param_update") \
        else None
    unhook = s.actor.before_param_update(gate.wait) if gate is not None else None
    loader = BackgroundLoad(rank0, gate)  # the engines' load of the latest version, when overlapped
    history: list[dict[str, float]] = []
    try:
        engines = s.start_engines(embedded_mode="process")
        if rank0:  # the engines already carry the trainer's version (start_engines)
            if not ray.is_initialized():
                init_ray(ray, job.loop.ray_address, job.loop.ray_num_cpus)
                ray_started = True
            worker = spawn_worker(ray, job.rollout, engines.router.urls, s.dataset, job.data.reward,
                                  groups_per_batch=n_groups, max_policy_lag=L, start_version=version,
                                  buffer_groups=buffer_groups, max_inflight_groups=inflight,
                                  route_spec=engines.router.clients[0].route_spec,
                                  pending_prompts=s.data_state.get("pending_prompts", []),
                                  router_state=(s.state or {}).get("router"))
        mlog = s.metrics_logger()
        ahead = None  # rank 0: the take of the next batch, sent before this one trains (a Ray object ref)
        previous = None  # rank 0: the last iteration's (snapshot, stats before training), read one iteration late
        for it in range(s.start + 1, job.loop.num_rollouts + 1):
            t0 = time.perf_counter()
            pull = partial(_pull, ray, worker, n_groups, version, ahead=ahead,
                           ask_ahead=it < job.loop.num_rollouts)
            batch, _, local = rank0_then_broadcast(rank0, pull, f"rollout {it}", actor=s.actor)
            rm, before, held, ahead = local if local is not None else ({}, {}, None, None)
            t1 = time.perf_counter()
            updates = s.actor.train_on_rollout(batch)
            t2 = time.perf_counter()
            fault_point("trained", it)  # tests: kill -9 with the updates done, nothing synced or saved
            # rank-0-only Ray calls: a failure is broadcast (below), so no rank waits alone in a collective.
            # The snapshot is asked for now; it is read now only when a checkpoint needs its data position,
            # else in the next iteration, when it is long there (its overlap metrics go into that row)
            asked, late_error = run_on_rank0(rank0, partial(_ask_snapshot, worker, held),
                                             f"rollout {it}: worker snapshot")
            version += 1
            sm = loader.join()  # collective: the previous version's background load (and its error)
            # loop.freeze_gc, once: here, where no background job holds the engines' event loop
            s.after_first_iteration(it, engines, worker)
            if overlap:
                sm.update(deferred_update(s, engines, version, job.loop.pause_mode, loader,
                                          then=partial(_set_version, ray, worker, version)))
                if gate is not None:  # this iteration's optimizer step waited for the last staging
                    sm["time/params_wait_s"] = gate.take_waited()
                sm["weight_sync/total_s"] = (sm["weight_sync/export_s"] + sm["time/weight_load_wait_s"]
                                             + sm.get("time/params_wait_s", 0.0))
            else:
                sm.update(update_engines(s, engines, version, job.loop.pause_mode))
                _, err = run_on_rank0(rank0, partial(_set_version, ray, worker, version),
                                      f"rollout {it}: worker version")
                late_error = late_error or err
            snap, err = run_on_rank0(rank0, partial(_read_snapshots, ray, previous, (asked, before), s.saves_state(it)),
                                     f"rollout {it}: worker snapshot")
            previous = (asked, before) if asked is not None else None
            late_error = late_error or err
            overlap_m, data_state = snap if snap is not None else ({}, None)
            rm.update(overlap_m)
            if s.evaluator.due(it):  # the evaluation generates with the engines: the load must be done
                wait = sm.pop("time/weight_load_wait_s", 0.0)
                sm.update(loader.join())
                sm["time/weight_load_wait_s"] += wait
            sm.update(s.evaluator.maybe_evaluate(it, engines, s.actor.model))  # held-out, loop.eval_every
            _, data_state, _ = rank0_then_broadcast(rank0, lambda ds=data_state: (None, ds, None),
                                                    f"rollout {it}: data position", error=late_error)
            # saved beside the data position, as the sync loop does (no data position: no checkpoint is due)
            router_state = data_state.pop("router", None) if data_state is not None else None
            summary = s.log_iteration(mlog, it, version, updates, {**rm, **sm}, t2 - t1, time.perf_counter() - t0)
            history.append(summary)
            if rank0:
                logger.info("rollout %d/%d: reward %.3f, lag %.2f (max %d), waited %.2fs, trained %.2fs, "
                            "overlap %.0f%%",
                            it, job.loop.num_rollouts, summary["rollout/reward_mean"], summary["async/lag_mean"],
                            summary["async/lag_max"], summary["time/wait_s"], t2 - t1,
                            100 * summary.get("async/overlap_frac", float("nan")))
            s.save(it, version, data_state, router_state)
        loader.join()  # the last load: its error fails the run on every rank
    finally:
        if unhook is not None:
            unhook()
        s.gc_pauses.remove()
        if mlog is not None:
            mlog.close()
        try:  # before anything else touches the engines' event loop
            loader.close()
        except BaseException:  # noqa: BLE001 - a second Ctrl-C must not skip the shutdown
            logger.warning("waiting for the background weight load failed during shutdown", exc_info=True)
        shutdown(ray, worker, engines, s.sync, ray_started)
    return history


def _pull(ray: Any, worker: Any, n_groups: int, version: int, ahead: Any = None,
          ask_ahead: bool = False) -> tuple[Any, None, tuple]:
    """Rank 0: the next rollout batch -> (batch, None, (metrics, stats before training, batch id, next take)).

    With ``ask_ahead`` the take of the batch after this one is sent now, for the version this
    batch's update will produce (``version + 1``): the worker answers while this batch trains,
    and the next pull mostly finds the answer waiting (the round trip and the wait for the
    last groups leave the trainer's path). The lag filter is the same as a take after the update,
    as versions only grow. "Stats before training" are then asked for separately (the held
    batch left the buffer during the previous update). The worker filters, collates and computes
    the batch's lag metrics with its own ``max_policy_lag`` (the job's ``loop.max_policy_lag``).
    """
    from_ahead = ahead is not None
    batch, metrics, stats, held = pull_groups(ray, worker, n_groups, version, ahead)
    nxt = worker.take.remote(n_groups, version + 1, POLL_S, True, collate_batch=True) if ask_ahead else None
    before = worker.stats.remote() if from_ahead else stats
    return batch, None, (metrics, before, held, nxt)


def _ask_snapshot(worker: Any, trained: Optional[int] = None) -> Any:
    """Rank 0, right after training: ask for the worker's snapshot (batch ``trained`` released); a Ray reference."""
    return worker.snapshot.remote(trained)


def _snapshot(ray: Any, asked: Any, before: Any) -> tuple[dict[str, float], dict]:
    """Rank 0: (overlap metrics since ``before`` -- worker stats, or a Ray reference to them -- and the
    worker's data position) from the snapshot ``asked`` for by :func:`_ask_snapshot`."""
    snap = ray.get(asked)
    before = before if isinstance(before, dict) else ray.get(before)
    return overlap_metrics(before, snap["stats"]), snap["state"]


def _read_snapshots(ray: Any, previous: Optional[tuple], current: tuple, need_state: bool
                    ) -> tuple[dict[str, float], Optional[dict]]:
    """Rank 0: (overlap metrics of the ``previous`` iteration's (snapshot, before) pair -- NaN in a run's
    first iteration, also a resumed one; this iteration's data position when ``need_state``, else None).

    Only ``need_state`` waits for this iteration's snapshot (a Ray round trip of 2-5 ms to a worker
    busy with HTTP and reward scoring, on the trainer's path); the previous one has long arrived.
    So the overlap metrics of a row describe the training of the rollout before it.
    """
    overlap_m = _snapshot(ray, *previous)[0] if previous is not None else dict.fromkeys(OVERLAP_KEYS, float("nan"))
    state = _snapshot(ray, *current)[1] if need_state and current[0] is not None else None
    return overlap_m, state


def _set_version(ray: Any, worker: Any, version: int) -> None:
    """Rank 0, once the engines serve ``version``: the worker's admission budget grows by one batch."""
    ray.get(worker.set_version.remote(version))


def shutdown(ray: Any, worker: Any, engines: Optional[Engines], sync: EngineWeightSync, ray_started: bool) -> None:
    """Stop the worker (cancel its requests), kill its actor, close the weight sync, stop the engines and Ray.

    Every step runs even when an earlier one fails (and on Ctrl-C), so nothing is left running.
    """
    steps = []
    if worker is not None:
        steps += [("stop rollout worker", lambda: ray.get(worker.stop.remote(), timeout=30)),
                  ("kill rollout worker", lambda: ray.kill(worker))]
    steps.append(("close weight sync", lambda: sync.close(engines)))
    if engines is not None:
        steps.append(("stop engines", engines.stop))
    if ray_started:
        steps.append(("stop Ray", ray.shutdown))
    for what, fn in steps:
        t0 = time.perf_counter()
        try:
            fn()
        except BaseException:  # noqa: BLE001 - keep shutting down; a second Ctrl-C must not leak processes
            logger.warning("%s failed during shutdown", what, exc_info=True)
        logger.info("shutdown: %s took %.1fs", what, time.perf_counter() - t0)
