"""The two threads that keep the distributed weight sync from blocking itself.

NCCL builds a group's communicator inside its first collective and blocks the calling thread
until every rank has joined; SGLang's engines (``init_custom_process_group`` without a
``device_id``, sglang 0.5.23 ``utils/common.py``) join only in that first collective, which they
run when they receive the first ``/update_weights_from_distributed`` request. So the thread that
broadcasts must never be the one that sends the requests (the old code broadcast on the event
loop that was to send them: a deadlock on NCCL, reproduced on CPU by
``tests/weight_sync/test_group_ordering.py``). Hence:

* :class:`EngineChannel`: a daemon thread running its own asyncio loop with its own
  ``SGLangClient`` per engine; every weight-sync HTTP call goes out from there.
* :class:`CollectiveThread`: a daemon thread that runs the weight group's collectives in order
  (set-up, broadcasts, waits) -- a hung collective blocks only it, and a group given up on is
  left to it while a new group gets a new thread.

The trainer's main thread only exports (its own collectives over the training group) and
waits on futures, so export of bucket k+1 overlaps the transfer of bucket k.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import Any, Awaitable, Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)


class EngineChannel:
    """HTTP to the engines from a thread of its own (its own event loop and clients).

    Args:
        clients: the loop's ``SGLangClient`` objects; copies with the same URL, timeout and
            retries are made for this thread (an httpx client belongs to one event loop).
    """

    def __init__(self, clients: Sequence[Any]) -> None:
        self.urls = [c.url for c in clients]
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="weight-sync-http", daemon=True)
        self._thread.start()
        specs = [(c.url, dict(timeout_s=float(getattr(c, "timeout_s", 600.0)),
                              max_retries=int(getattr(c, "max_retries", 3)),
                              backoff_s=float(getattr(c, "backoff_s", 0.5)),
                              **({"transport": c.transport} if getattr(c, "transport", None) is not None else {})))
                 for c in clients]
        self.clients: list[Any] = self.call(self._make_clients(specs), timeout=60)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @staticmethod
    async def _make_clients(specs: list) -> list:
        from megatron_vespo.rollout.client import SGLangClient

        return [SGLangClient(url, **kw) for url, kw in specs]

    def submit(self, coro: Awaitable[Any]) -> "concurrent.futures.Future[Any]":
        """Start ``coro`` on the channel's loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Awaitable[Any], timeout: Optional[float] = None) -> Any:
        """Run ``coro`` on the channel's loop and wait for its result (raises its exception)."""
        return self.submit(coro).result(timeout)

    def each(self, fn: Callable[[Any], Awaitable[Any]]) -> list["concurrent.futures.Future[Any]"]:
        """``fn(client)`` for every engine, concurrently; one future per engine, in order."""
        return [self.submit(fn(c)) for c in self.clients]

    def close(self) -> None:
        """Close the clients and stop the thread (best effort, bounded)."""
        if self.loop.is_closed():
            return
        async def close_all() -> None:
            await asyncio.gather(*[c.aclose() for c in self.clients], return_exceptions=True)
        try:
            self.call(close_all(), timeout=10)
        except Exception:  # noqa: BLE001 - shutting down anyway
            logger.debug("closing weight-sync HTTP clients failed", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


def wait_all(futures: Sequence["concurrent.futures.Future[Any]"], timeout: float,
             run: Optional[Callable[[Awaitable[Any]], Any]] = None, first_exception: bool = False) -> list[Any]:
    """Wait for ``futures`` (at most ``timeout`` s; with ``first_exception`` only until one fails);
    each one's result or exception (``TimeoutError`` if still pending), in order.

    With ``run`` (the loop's ``run_until_complete``) the wait happens inside the caller's event
    loop, so its own traffic (e.g. generation requests) keeps flowing meanwhile.
    """
    when = concurrent.futures.FIRST_EXCEPTION if first_exception else concurrent.futures.ALL_COMPLETED
    if run is not None:
        async def waiter() -> None:
            loop, event = asyncio.get_running_loop(), asyncio.Event()

            def check(f: "concurrent.futures.Future[Any]") -> None:
                failed = first_exception and not f.cancelled() and f.exception() is not None
                if (failed or all(x.done() for x in futures)) and not loop.is_closed():
                    loop.call_soon_threadsafe(event.set)
            for f in futures:
                f.add_done_callback(check)
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        run(waiter())
    else:
        concurrent.futures.wait(futures, timeout=timeout, return_when=when)
    out: list[Any] = []
    for f in futures:
        if not f.done():
            out.append(TimeoutError(f"no answer within {timeout:.0f}s"))
        elif f.cancelled():
            out.append(concurrent.futures.CancelledError())
        else:
            out.append(f.exception() or f.result())
    return out


class CollectiveThread:
    """A daemon thread that runs the weight group's collectives, one after another.

    Args:
        device: CUDA device the collectives use (NCCL), set on the thread; None for CPU.
    """

    def __init__(self, device: Optional[torch.device] = None, name: str = "weight-sync-collectives") -> None:
        self.device = device
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            fn, fut = self._queue.get()
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                fut.set_exception(exc)

    def submit(self, fn: Callable[[], Any]) -> "concurrent.futures.Future[Any]":
        """Queue ``fn`` (runs after everything queued before it); returns its future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, fut))
        return fut

    @property
    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop after the queued work (a collective stuck forever keeps its daemon thread)."""
        self._queue.put((None, None))
