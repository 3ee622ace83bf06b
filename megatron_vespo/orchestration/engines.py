"""Start (or attach to) the rollout engines a job's ``rollout`` section describes.

``engine: embedded`` starts our CPU server(s) on an HF directory (in this process for one
engine, as child processes for several); ``engine: sglang`` launches
``python -m sglang.launch_server`` per engine, or attaches to ``rollout.urls``. Either way the
loop talks to them through one :class:`~megatron_vespo.rollout.router.EngineRouter`, the same
HTTP client code everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Awaitable, Optional

from megatron_vespo.rollout.config import RolloutConfig
from megatron_vespo.rollout.router import EngineRouter
from megatron_vespo.rollout.routes import RouteSpec

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0  # per client, on shutdown


class RolloutEngines:
    """Running engines plus the router and the event loop used to talk to them (rank 0 only).

    Use as a context manager; ``stop()`` stops every engine this object started (attached
    engines are left running). ``embedded_mode`` forces ``thread`` or ``process`` embedded
    servers (default: a thread for one engine, processes for several); the async loop wants
    processes, so generation does not share the trainer's interpreter lock.
    """

    def __init__(self, cfg: RolloutConfig, model_path: str, *, log_dir: Optional[str] = None,
                 embedded_mode: Optional[str] = None) -> None:
        if embedded_mode not in (None, "thread", "process"):
            raise ValueError(f"embedded_mode must be thread, process or None, got {embedded_mode!r}")
        self.cfg, self.model_path, self.embedded_mode = cfg, model_path, embedded_mode
        self.log_dir = Path(log_dir or cfg.log_dir or "outputs/rollout_logs")
        self.loop = asyncio.new_event_loop()
        self._handles: list[Any] = []
        self.router: Optional[EngineRouter] = None

    def run(self, awaitable: Awaitable[Any]) -> Any:
        """Run a coroutine on the engines' event loop."""
        return self.loop.run_until_complete(awaitable)

    def start(self) -> "RolloutEngines":
        """Start or attach to the engines and build the router; cleans up on failure."""
        try:
            urls = self._start_engines()
            spec = RouteSpec.from_hf_config(self.model_path) if self.cfg.return_routed_experts else None
            self.router = EngineRouter.from_config(self.cfg, urls, spec)
            self.run(self._wait_healthy())
        except BaseException:
            self.stop()
            raise
        logger.info("rollout engines ready: %s", ", ".join(urls))
        return self

    def _start_engines(self) -> list[str]:
        cfg = self.cfg
        if cfg.urls:
            from megatron_vespo.rollout.sglang_server import attach_servers

            attach_servers(cfg.urls, timeout_s=cfg.launch_timeout_s)
            return list(cfg.urls)
        if cfg.engine == "sglang":
            from megatron_vespo.rollout.sglang_server import launch_sglang_servers

            self._handles = launch_sglang_servers(cfg, log_dir=str(self.log_dir), model_path=self.model_path)
            return [h.url for h in self._handles]
        from megatron_vespo.rollout.embedded.server import start_embedded_server

        mode = self.embedded_mode or ("thread" if cfg.num_engines == 1 else "process")
        env = None
        if mode == "process":  # the async loop asks for processes: they compute while the trainer trains
            from megatron_vespo.orchestration.threads import engine_threads

            threads = engine_threads(cfg, overlapped=self.embedded_mode == "process")
            env = None if threads is None else {"OMP_NUM_THREADS": str(threads)}
        for i in range(cfg.num_engines):
            self._handles.append(start_embedded_server(
                self.model_path, host=cfg.host, mode=mode, random_seed=i, max_batch_size=cfg.max_batch_size,
                batch_wait_ms=cfg.batch_wait_ms, env=env,
                log_path=str(self.log_dir / f"embedded_{i}.log") if mode == "process" else None))
        return [h.url for h in self._handles]

    async def _wait_healthy(self) -> None:
        for client in self.router.clients:
            await client.wait_healthy(self.cfg.launch_timeout_s)

    def stop(self) -> None:
        """Stop engines started here and close the clients and the event loop."""
        if self.router is not None:
            for client in self.router.clients:
                try:  # bounded: after a Ctrl-C mid-request a connection may never finish closing
                    self.run(asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT_S))
                except Exception:  # noqa: BLE001 - best effort on shutdown
                    logger.debug("closing client %s failed", client.url, exc_info=True)
            self.router = None
        for h in self._handles:
            h.stop()
        self._handles = []
        if not self.loop.is_closed():
            self.loop.close()

    def __enter__(self) -> "RolloutEngines":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
