"""Spread generation over several engines; broadcast control calls to all of them.

Two policies: ``round_robin`` and ``least_outstanding`` (fewest requests in flight from this
process, ties broken round-robin). It is enough for a handful of data-parallel engines driven
by one controller. For many engines, several controllers or cache-aware routing, run SGLang's
own router (``python -m sglang_router.launch_router --worker-urls URL1 URL2 ...``) and point one
``SGLangClient`` at it; keep weight updates going to each engine directly.

``EngineRouter.busy`` (:class:`EngineBusyTime`) accumulates, per engine, the time at least one of
this router's generate requests was outstanding there: the client-side measure of how long each
engine generated for us (the async loop's ``async/overlap_frac``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Awaitable, Callable, Literal, Mapping, Optional, Sequence

from megatron_vespo.rollout.client import SGLangClient
from megatron_vespo.rollout.config import RolloutConfig, SamplingConfig
from megatron_vespo.rollout.routes import RouteSpec
from megatron_vespo.types import Sample

logger = logging.getLogger(__name__)

Policy = Literal["round_robin", "least_outstanding"]


class EngineBusyTime:
    """Per engine: cumulative seconds with at least one generate request outstanding.

    Overlapping requests on one engine count once (the engine serves them in one batch); a
    request counts from the moment it is sent until its answer arrives, so time a caller spends
    waiting before sending (admission, the client's concurrency limit) does not. ``clock`` is
    injectable for tests.
    """

    def __init__(self, num_engines: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._open = [0] * num_engines
        self._since = [0.0] * num_engines
        self._total = [0.0] * num_engines

    @contextlib.contextmanager
    def during(self, engine: int) -> Any:
        """``with busy.during(e):`` around one request to engine ``e``."""
        if self._open[engine] == 0:
            self._since[engine] = self._clock()
        self._open[engine] += 1
        try:
            yield
        finally:
            self._open[engine] -= 1
            if self._open[engine] == 0:
                self._total[engine] += self._clock() - self._since[engine]

    def totals(self, now: Optional[float] = None) -> list[float]:
        """Busy seconds per engine up to ``now`` (default: the clock now), a busy engine's open interval included.

        A caller that also reports the clock passes the same reading, so busy time between two
        snapshots never exceeds the clock time between them.
        """
        now = self._clock() if now is None else now
        return [t + (now - s if n else 0.0) for t, s, n in zip(self._total, self._since, self._open)]


class EngineRouter:
    """Same ``generate`` API as ``SGLangClient``, over several clients."""

    def __init__(self, clients: Sequence[SGLangClient], policy: Policy = "least_outstanding"):
        if not clients:
            raise ValueError("EngineRouter needs at least one engine client")
        if policy not in ("round_robin", "least_outstanding"):
            raise ValueError(f"router policy must be round_robin or least_outstanding, got {policy!r}")
        self.clients = list(clients)
        self.policy = policy
        self._rr = 0  # requests routed so far (round-robin position)
        self._seeds = 0  # per-request seeds handed out so far (see ``generate``)
        self.busy = EngineBusyTime(len(self.clients))

    @classmethod
    def from_config(cls, cfg: RolloutConfig, urls: Sequence[str],
                    route_spec: Optional[RouteSpec] = None) -> "EngineRouter":
        """One client per URL, configured from ``cfg``."""
        return cls([SGLangClient.from_config(cfg, u, route_spec) for u in urls], cfg.router_policy)

    def state_dict(self) -> dict[str, int]:
        """The counters that decide the next requests' seeds and engines (saved in training checkpoints).

        A resumed run that restarted them at 0 would sample every later rollout with the seeds of
        the first ones, so it would leave the uninterrupted run's trajectory.
        """
        return {"seed_counter": self._seeds, "rr_counter": self._rr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the counters saved by ``state_dict``; ValueError names a bad entry."""
        for key in ("seed_counter", "rr_counter"):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"router state {key} must be an integer >= 0, got {value!r}")
        self._seeds, self._rr = int(state.get("seed_counter", 0)), int(state.get("rr_counter", 0))

    @property
    def urls(self) -> list[str]:
        """Engine URLs in order."""
        return [c.url for c in self.clients]

    def pick(self) -> SGLangClient:
        """The client the next request goes to."""
        start = self._rr % len(self.clients)
        self._rr += 1
        order = self.clients[start:] + self.clients[:start]
        if self.policy == "round_robin":
            return order[0]
        return min(order, key=lambda c: c.outstanding)  # min keeps the first of equals: round-robin ties

    async def generate(self, prompt_tokens: Sequence[int], sampling: SamplingConfig | Mapping[str, Any],
                       **kwargs: Any) -> Sample:
        """Generate on the chosen engine (see ``SGLangClient.generate``).

        A ``SamplingConfig`` base seed is turned into per-request seeds here, from the router's
        own counter: per-client counters would give the n samples of a prompt that land on
        different engines the same seed, hence identical responses.
        """
        if isinstance(sampling, SamplingConfig) and sampling.sampling_seed is not None:
            seed, self._seeds = sampling.sampling_seed + self._seeds, self._seeds + 1
            sampling = sampling.to_sglang(seed)
        return await self._on(self.pick(), lambda c: c.generate(prompt_tokens, sampling, **kwargs))

    async def _on(self, client: SGLangClient, call: Callable[[SGLangClient], Awaitable[Any]]) -> Any:
        """``call(client)``, counted in ``busy`` for that engine."""
        with self.busy.during(self.clients.index(client)):
            return await call(client)

    async def generate_batch(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | Mapping[str, Any],
                             n_samples_per_prompt: int = 1) -> list[Sample]:
        """``n_samples_per_prompt`` samples per prompt spread over the engines; group_index = prompt index."""
        tasks = [self.generate(p, sampling, group_index=g) for g, p in enumerate(prompts)
                 for _ in range(n_samples_per_prompt)]
        return list(await asyncio.gather(*tasks))

    async def generate_groups(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | Mapping[str, Any],
                              n_samples_per_prompt: int, *, first_group: int = 0,
                              metadata: Optional[Sequence[Mapping[str, Any]]] = None,
                              batched: bool = True) -> list[Sample]:
        """``n_samples_per_prompt`` samples per prompt, in prompt-major order; group g+first_group = prompt g.

        ``batched``: the groups are dealt whole to the engines (each engine gets about the same
        number of rows, fewest outstanding first) and each engine receives them as ONE batched
        ``/generate`` (``SGLangClient.generate_many``). Otherwise one request per sample
        (``generate``), the path for SGLang's router. Seeds come from the router's counter in
        prompt-major order either way, so both paths ask for the same samples.
        """
        n = n_samples_per_prompt
        rows = [(first_group + g, p, dict((metadata or [{}] * len(prompts))[g] or {}))
                for g, p in enumerate(prompts) for _ in range(n)]
        params = [self._params(sampling) for _ in rows]
        if not batched:
            return list(await asyncio.gather(*(
                self._on(self.pick(), lambda c, p=p, sp=sp, g=g, md=md: c.generate(p, sp, group_index=g, metadata=md))
                for (g, p, md), sp in zip(rows, params))))
        # deal whole groups: engine e gets groups e, e + E, ... starting from the least loaded engine
        order = sorted(range(len(self.clients)), key=lambda i: (self.clients[i].outstanding, i))
        shares: dict[int, list[int]] = {}
        for g in range(len(prompts)):
            shares.setdefault(order[g % len(order)], []).extend(range(g * n, (g + 1) * n))
        results: list[Optional[Sample]] = [None] * len(rows)

        async def one(engine: int, idx: list[int]) -> None:
            with self.busy.during(engine):
                out = await self.clients[engine].generate_many(
                    [rows[i][1] for i in idx], [params[i] for i in idx], group_indices=[rows[i][0] for i in idx],
                    metadata=[rows[i][2] for i in idx])
            for i, sample in zip(idx, out):
                results[i] = sample
        await asyncio.gather(*(one(e, idx) for e, idx in shares.items()))
        return list(results)  # type: ignore[arg-type]

    def _params(self, sampling: SamplingConfig | Mapping[str, Any]) -> dict[str, Any]:
        """Raw ``sampling_params`` of the next request (a base seed becomes the router's next seed)."""
        if isinstance(sampling, SamplingConfig):
            if sampling.sampling_seed is None:
                return sampling.to_sglang(None)
            seed, self._seeds = sampling.sampling_seed + self._seeds, self._seeds + 1  # the counter state_dict saves
            return sampling.to_sglang(seed)
        return dict(sampling)

    async def broadcast(self, fn: Callable[[SGLangClient], Awaitable[Any]]) -> list[Any]:
        """Run ``fn(client)`` on every engine concurrently; the first failure is raised."""
        return list(await asyncio.gather(*(fn(c) for c in self.clients)))

    async def update_weights_from_disk(self, model_path: str, policy_version: int, **kwargs: Any) -> list[dict]:
        """Load ``model_path`` on every engine, tagged ``policy_version``."""
        return await self.broadcast(lambda c: c.update_weights_from_disk(model_path, policy_version, **kwargs))

    async def weight_versions(self) -> list[str]:
        """Each engine's weight version."""
        return await self.broadcast(lambda c: c.weight_version())

    async def flush_cache(self) -> None:
        """Flush every engine's prefix cache."""
        await self.broadcast(lambda c: c.flush_cache())

    async def pause_generation(self, mode: str = "abort") -> None:
        """Pause every engine."""
        await self.broadcast(lambda c: c.pause_generation(mode))

    async def continue_generation(self) -> None:
        """Resume every engine."""
        await self.broadcast(lambda c: c.continue_generation())

    async def abort_all(self) -> None:
        """Abort every request on every engine."""
        await self.broadcast(lambda c: c.abort_request(abort_all=True))

    async def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Wait until every engine answers ``/health``."""
        await self.broadcast(lambda c: c.wait_healthy(timeout_s))

    async def aclose(self) -> None:
        """Close every client."""
        await self.broadcast(lambda c: c.aclose())
