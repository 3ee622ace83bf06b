"""The rollout worker of the fully asynchronous loop: continuous generation into a bounded buffer.

``RolloutWorker`` holds the engine clients (an ``EngineRouter`` over the engine URLs), the
prompt data set and the reward function. Once started it keeps up to ``max_inflight_groups``
prompt groups generating, scores each finished group and puts usable ones in a
``GroupBuffer``; ``StalenessGate`` decides when it may start another group (see
``async_buffer``). The trainer pulls whole groups with ``take``. Every method is a coroutine,
so the same object runs on a plain asyncio loop (tests, no Ray) or as a Ray async actor
(``spawn_worker``), where all calls share the actor's event loop and never race.

Finished groups:

* any sample FLAGGED (misaligned routes, bad log-probs): the group is dropped (counted);
* any sample ABORTED (a weight update with ``loop.pause_mode=abort``): the prompt is queued
  again and generated from scratch by the new weights -- no partial rollout is resumed, so a
  trained sample never mixes versions in this mode;
* otherwise scored and buffered. With ``pause_mode=in_place`` a request in flight across an
  update finishes with the new weights; ``rollout.protocol`` tags it with its first token's
  version, and its lag is counted from that (conservative).

Resume: ``state_dict`` is the data set position plus the prompts handed out but not yet
trained on (in flight, buffered, waiting for a retry); a resumed worker generates those
first, so no prompt is skipped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from typing import Any, Optional, Sequence

from megatron_vespo.buffer import collate
from megatron_vespo.data import Prompt, PromptDataset
from megatron_vespo.orchestration.async_buffer import GroupBuffer, StalenessGate, lag_metrics
from megatron_vespo.orchestration.collect import multi_version_frac, sample_metrics
from megatron_vespo.rewards import get_reward, score_samples
from megatron_vespo.rollout.config import RolloutConfig
from megatron_vespo.rollout.router import EngineRouter
from megatron_vespo.rollout.routes import RouteSpec
from megatron_vespo.types import Sample, SampleStatus

logger = logging.getLogger(__name__)


class RolloutWorkerError(RuntimeError):
    """Generation failed inside the rollout worker (the message carries the original error)."""


class RolloutWorker:
    """Continuous group generation (see the module docstring).

    Args:
        cfg: rollout config (sampling, n_samples_per_prompt, client knobs).
        urls: engine base URLs.
        dataset: prompt source; its position advances as prompts are handed out.
        reward: reward registry name.
        groups_per_batch: groups the trainer takes per rollout batch (B).
        max_policy_lag: L.
        start_version: the trainer's (and engines') policy version at start.
        buffer_groups / max_inflight_groups: bounds (see ``LoopConfig``).
        route_spec: route shape when ``cfg.return_routed_experts``.
        pending_prompts: prompt indices to generate first (from ``state_dict`` on resume).
        router: a ready router (tests); default: built from ``cfg`` and ``urls`` in ``start``.
        router_state: the router's saved counters (``state_dict()["router"]`` on resume).
    """

    def __init__(self, cfg: RolloutConfig, urls: Sequence[str], dataset: PromptDataset, reward: str, *,
                 groups_per_batch: int, max_policy_lag: int, start_version: int, buffer_groups: int,
                 max_inflight_groups: int, route_spec: Optional[RouteSpec] = None,
                 pending_prompts: Sequence[int] = (), router: Optional[EngineRouter] = None,
                 router_state: Optional[dict] = None) -> None:
        self.cfg, self.urls, self.dataset = cfg, list(urls), dataset
        self.reward_fn = get_reward(reward)
        self.max_policy_lag = max_policy_lag
        self.version = int(start_version)
        self.buffer = GroupBuffer(buffer_groups)
        self.gate = StalenessGate(groups_per_batch, max_policy_lag, start_version,
                                  max_inflight=max_inflight_groups, buffer_capacity=buffer_groups)
        self.route_spec, self.router = route_spec, router
        self.router_state = dict(router_state or {})  # resume: the seed counter continues
        bad = [i for i in pending_prompts if not 0 <= int(i) < len(dataset.prompts)]
        if bad:
            raise ValueError(f"pending prompt indices {bad[:5]} are outside the data set of {len(dataset.prompts)}")
        self._retry: deque[Prompt] = deque(dataset.prompts[int(i)] for i in pending_prompts)
        self._inflight: dict[int, tuple[Prompt, asyncio.Task]] = {}
        self._gids = itertools.count()
        self._wake = asyncio.Event()  # admission may have changed
        self._data = asyncio.Event()  # a group finished
        self._runner: Optional[asyncio.Task] = None
        self._error: Optional[str] = None
        self._stopping = False
        self.counters = {"samples": 0, "tokens": 0, "groups": 0, "flagged_samples": 0, "aborted_groups": 0,
                         "stale_samples": 0, "reward_nonfinite": 0}
        self._last_take = time.perf_counter()
        self._last_counters = dict(self.counters)
        # batches handed out by take(hold=True) and not yet reported trained (snapshot(trained=...)):
        # their prompts stay pending in state_dict, so a checkpoint taken meanwhile loses none
        self._held: dict[int, list[int]] = {}
        self._batch_ids = itertools.count()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        """Build the router (unless given), start generating; returns this process's pid."""
        if self.router is None:
            self.router = EngineRouter.from_config(self.cfg, self.urls, self.route_spec)
        if self.router_state and hasattr(self.router, "load_state_dict"):
            self.router.load_state_dict(self.router_state)
        for c in self.router.clients:  # fallback tag when an engine's version string is not an int
            c.policy_version = self.version
        self._runner = asyncio.create_task(self._run())
        return os.getpid()

    async def stop(self) -> None:
        """Stop generating: cancel in-flight groups (their HTTP requests close) and close the clients."""
        self._stopping = True
        tasks = list({id(t): t for _, t in self._inflight.values()}.values())  # groups launched together share one
        tasks += [self._runner] if self._runner else []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.router is not None:
            await asyncio.gather(*(c.aclose() for c in self.router.clients), return_exceptions=True)

    async def ping(self) -> bool:
        """Liveness check."""
        return True

    # ------------------------------------------------------------------ generation
    async def _run(self) -> None:
        while not self._stopping and self._error is None:
            prompts = [self._retry.popleft() if self._retry else self.dataset.next_batch(1)[0]
                       for _ in range(max(0, self.gate.capacity(self.version, len(self.buffer))))]
            if prompts:
                self._launch(prompts)
            self._wake.clear()  # no await since capacity() was read: no wake-up can be missed
            await self._wake.wait()

    def _launch(self, prompts: list[Prompt]) -> None:
        """Start the groups of ``prompts`` as ONE batched generation (group ids consecutive).

        The engine then runs them as one forward batch: launched one task per group, the
        requests reached the embedded engine apart and it ran each rollout batch as two or
        more batches (e.g. 8 + 56 rows; measured, docs/performance.md).
        """
        gids = [next(self._gids) for _ in prompts]
        for _ in prompts:
            self.gate.on_started()
        task = asyncio.create_task(self._groups(gids, prompts))
        for gid, prompt in zip(gids, prompts):
            self._inflight[gid] = (prompt, task)

    async def _groups(self, gids: list[int], prompts: list[Prompt]) -> None:
        md = [{"label": p.label, "prompt_index": p.index} for p in prompts]
        n = self.cfg.n_samples_per_prompt
        try:
            # all groups as one batched /generate (rollout.batch_requests), else one request per sample
            samples = await self.router.generate_groups([p.tokens for p in prompts], self.cfg.sampling, n,
                                                        first_group=gids[0], metadata=md,
                                                        batched=self.cfg.batch_requests)
            for i, (gid, prompt) in enumerate(zip(gids, prompts)):
                self._finish(gid, prompt, samples[i * n:(i + 1) * n])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - surfaced to the trainer by take()
            logger.exception("rollout groups %d-%d failed", gids[0], gids[-1])
            self._error = f"{type(exc).__name__}: {exc}"
        finally:
            for gid in gids:
                self._inflight.pop(gid, None)
            self._wake.set()
            self._data.set()

    def _finish(self, gid: int, prompt: Prompt, samples: list[Sample]) -> None:
        self.counters["samples"] += len(samples)
        self.counters["tokens"] += sum(len(s.response_tokens) for s in samples)
        if any(s.status == SampleStatus.FLAGGED for s in samples):
            reasons = {r for s in samples for r in s.metadata.get("flag_reasons", [])}
            logger.warning("dropping group %d (prompt %d): %s", gid, prompt.index, "; ".join(sorted(reasons)))
            self.counters["flagged_samples"] += len(samples)
            self.gate.on_rejected()
        elif any(s.status == SampleStatus.ABORTED for s in samples):
            self.counters["aborted_groups"] += 1
            self._retry.append(prompt)
            self.gate.on_rejected()
        elif n_bad := score_samples(samples, self.reward_fn, [prompt.label] * len(samples)):  # NaN: flagged
            logger.warning("dropping group %d (prompt %d): non-finite reward", gid, prompt.index)
            self.counters["flagged_samples"] += len(samples)
            self.counters["reward_nonfinite"] += n_bad
            self.gate.on_rejected()
        else:
            self.buffer.put(samples)
            self.gate.on_accepted()
            self.counters["groups"] += 1

    # ------------------------------------------------------------------ trainer side
    def _check(self) -> None:
        if self._error is not None:
            raise RolloutWorkerError(f"rollout worker failed: {self._error}")

    async def take(self, n_groups: int, current_version: int, timeout_s: float, hold: bool = False,
                   collate_batch: bool = False) -> dict[str, Any]:
        """Wait up to ``timeout_s`` for ``n_groups`` groups with lag <= L at ``current_version``.

        Returns ``{"groups": [...] (empty on timeout), "metrics": {...}, "stats": stats_now(),
        "batch": id}``; the metrics cover the time since the previous successful take (generation
        throughput, drops, buffer fill); ``stats`` is the snapshot taken as the batch leaves.
        ``current_version`` is the version the batch will be trained at (the trainer may ask for
        the next batch before its current update ends). With ``hold`` the batch's prompts stay
        pending in ``state_dict`` until ``snapshot(trained=id)`` reports it trained.
        With ``collate_batch`` a batch comes as ``"train_batch"`` (``buffer.collate`` of its
        samples: GRPO advantages, pad id 0, as the async loop trains) with the batch's lag and
        sample metrics in ``"metrics"``, and ``"groups"`` is None: the collation runs here, in
        the worker's process, while the trainer trains, and only tensors cross to the trainer.
        Raises ``RolloutWorkerError`` when generation failed.
        """
        self._check()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        fill, stale = len(self.buffer), 0
        while True:
            res = self.buffer.take(n_groups, current_version, self.max_policy_lag)
            if res.stale_groups:
                stale += res.stale_samples
                self.gate.on_stale(res.stale_groups)
                self._wake.set()
                logger.info("dropped %d stale groups (%d samples) at version %d", res.stale_groups,
                            res.stale_samples, current_version)
            if res.groups or loop.time() >= deadline:
                break
            self._data.clear()
            try:
                await asyncio.wait_for(self._data.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                pass
            self._check()
        self.counters["stale_samples"] += stale
        if not res.groups:
            return {"groups": [], "metrics": {}, "stats": self.stats_now(), "batch": None}
        self._wake.set()  # buffer room freed
        batch = next(self._batch_ids)
        if hold:
            self._held[batch] = [int(g[0].metadata["prompt_index"]) for g in res.groups]
        out = {"groups": res.groups, "metrics": self._interval_metrics(fill), "stats": self.stats_now(),
               "batch": batch}
        if collate_batch:
            out.update(self._collated(res.groups, current_version, out["metrics"]))
        return out

    def _collated(self, groups: list, version: int, metrics: dict[str, float]) -> dict[str, Any]:
        """``groups`` as the trainer's batch plus its lag / sample metrics (``take(collate_batch=True)``)."""
        samples = [x for g in groups for x in g]
        metrics = {**metrics, **lag_metrics(groups, version, self.max_policy_lag), **sample_metrics(samples),
                   "async/multi_version_frac": multi_version_frac(samples)}
        return {"groups": None, "train_batch": collate(samples), "metrics": metrics}

    def _interval_metrics(self, fill: int) -> dict[str, float]:
        now, c = time.perf_counter(), self.stats_now()
        dt, prev = max(now - self._last_take, 1e-9), self._last_counters
        self._last_take, self._last_counters = now, c
        d = {k: c[k] - prev[k] for k in ("samples", "tokens", "flagged_samples", "aborted_groups", "stale_samples",
                                         "reward_nonfinite")}
        return {"rollout/samples_generated": float(d["samples"]), "rollout/tokens_per_s": d["tokens"] / dt,
                "async/stale_dropped_samples": float(d["stale_samples"]),
                "async/flagged_dropped_samples": float(d["flagged_samples"]),
                "rollout/reward_nonfinite": float(d["reward_nonfinite"]),
                "async/aborted_regenerated_groups": float(d["aborted_groups"]),
                "async/buffer_groups": float(fill), "async/buffer_fill": fill / self.buffer.capacity,
                "async/inflight_groups": float(len(self._inflight))}

    async def freeze_gc(self) -> dict[str, int]:
        """Freeze this process's start-up heap (``utils/gc_control.freeze_gc``; the loop asks after its warm-up)."""
        from megatron_vespo.utils.gc_control import freeze_gc

        return freeze_gc("the rollout worker")

    async def set_version(self, version: int) -> None:
        """The trainer synced ``version`` to the engines: admission budget grows by one batch."""
        self.version = int(version)
        self._wake.set()

    def stats_now(self) -> dict[str, float]:
        """Cumulative counters; ``engine_busy_s``: per engine, the seconds a generate request of this
        worker was outstanding there (``EngineRouter.busy``; empty for a router without it);
        ``clock_s`` is the same clock, so two snapshots give each engine's busy fraction between them."""
        c: dict[str, Any] = dict(self.counters)
        busy, now = getattr(self.router, "busy", None), time.perf_counter()  # EngineBusyTime's clock
        c.update(buffered=len(self.buffer), inflight=len(self._inflight),
                 engine_busy_s=busy.totals(now) if busy is not None else [], clock_s=now)
        return c

    async def stats(self) -> dict[str, float]:
        """``stats_now`` as a coroutine (remote call); never raises (errors surface in ``take``)."""
        return self.stats_now()

    async def snapshot(self, trained: Optional[int] = None) -> dict[str, Any]:
        """``{"stats": stats_now(), "state": state_dict()}`` in one call (the trainer's, right after training).

        ``trained``: the id of the held batch (``take(hold=True)``) just trained, released first.
        The data position may be read before the trainer publishes its new version: ``set_version``
        only widens admission and changes no prompt's status, and every prompt of the batch just
        trained left the buffer at ``take``, so the position is a consistent cut either way (prompts
        handed out later, or taken ahead and held, are generated again by a run resumed from it).
        """
        if trained is not None:
            self._held.pop(trained, None)
        return {"stats": self.stats_now(), "state": await self.state_dict()}

    async def state_dict(self) -> dict[str, Any]:
        """Data set position plus ``pending_prompts``: handed out but not trained on, oldest first."""
        pending = [i for b in sorted(self._held) for i in self._held[b]]
        pending += [int(g[0].metadata["prompt_index"]) for g in self.buffer.groups()]
        pending += [p.index for p, _ in self._inflight.values()] + [p.index for p in self._retry]
        saver = getattr(self.router, "state_dict", None)  # any object with generate() may route (tests)
        router = saver() if saver is not None else dict(self.router_state)
        return {**self.dataset.state_dict(), "pending_prompts": pending, "router": router}


def spawn_worker(ray: Any, *args: Any, **kwargs: Any) -> Any:
    """Start a ``RolloutWorker(*args, **kwargs)`` Ray actor on this node and start it generating.

    The actor asks for no CPU (it waits on HTTP) and is pinned to the caller's node, where the
    engines it was given the URLs of are reachable. Returns the actor handle.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    handle = ray.remote(RolloutWorker).options(
        num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote(*args, **kwargs)
    try:
        pid = ray.get(handle.start.remote())
    except BaseException:
        ray.kill(handle)
        raise
    logger.info("rollout worker running (Ray actor, pid %d)", pid)
    return handle
