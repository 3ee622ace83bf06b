"""Python's cyclic garbage collector in a training process: freeze the start-up heap, time the pauses.

Why: a trainer process holds ~500k tracked objects after start-up (megatron-core, transformers,
torch, Ray), and a full (generation 2) collection walks all of them. On the CPU addition task
(issue 15) one such collection took 400-450 ms, once every ~10 iterations of ~250 ms: in the
async loop it stalled the engine's weight load and the trainer waited for the batch
(``time/wait_s`` 0.4 s at rollout 11 of every run; ``gc.callbacks`` timing, docs/performance.md).
``gc.freeze()`` moves every object alive at that moment to a permanent generation that later
collections skip, so they walk only what the run creates afterwards.

The same remedy upstream: SGLang's ``freeze_gc`` (``/freeze_gc`` endpoint; sglang.srt.utils,
which also warns on long collections and advises freezing "after sending a few warmup
requests"), vLLM's ``freeze_gc_heap`` after warm-up, Megatron-LM's ``--manual-gc`` (threshold
collection off, explicit ``gc.collect()`` every N iterations). Freezing keeps the automatic
collector for everything new, so cycles created during training are still collected; what was
frozen is never collected again (start-up objects live for the whole run anyway).
"""

from __future__ import annotations

import gc
import logging
import threading
import time

logger = logging.getLogger(__name__)


def freeze_gc(context: str) -> dict[str, int]:
    """Collect once, then freeze every tracked object (``gc.freeze``); returns the counts.

    The collection first, so garbage that exists now is freed rather than frozen for good.
    Safe to call again later: each call freezes what has accumulated since.
    """
    before = len(gc.get_objects())
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("froze the garbage collector's heap in %s: %d tracked objects, %d frozen in all (%.0f ms)",
                context, before, frozen, 1e3 * (time.perf_counter() - t0))
    return {"tracked_before": before, "frozen": frozen}


class GcPauses:
    """Wall time spent in the cyclic collector, per generation, from ``gc.callbacks``.

    ``take()`` returns the seconds collected since the previous ``take`` (a metric per
    iteration: ``time/gc_s``); collections longer than ``warn_s`` are logged.
    """

    def __init__(self, warn_s: float = 0.1) -> None:
        self.warn_s = warn_s
        self._lock = threading.Lock()
        self._start: dict[int, float] = {}  # by thread: a collection runs in the thread that triggered it
        self._total = 0.0
        self._longest = 0.0
        self._installed = False

    def install(self) -> "GcPauses":
        """Start timing (idempotent)."""
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True
        return self

    def remove(self) -> None:
        """Stop timing."""
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def _callback(self, phase: str, info: dict) -> None:
        now, me = time.perf_counter(), threading.get_ident()
        if phase == "start":
            self._start[me] = now
            return
        took = now - self._start.pop(me, now)
        with self._lock:
            self._total += took
            self._longest = max(self._longest, took)
        if took > self.warn_s:
            logger.warning("garbage collection of generation %s took %.0f ms (%s objects collected); "
                           "loop.freeze_gc=true freezes the start-up heap", info.get("generation"), 1e3 * took,
                           info.get("collected"))

    def take(self) -> dict[str, float]:
        """``{"time/gc_s": seconds in the collector, "time/gc_max_s": longest pause}`` since the last take."""
        with self._lock:
            out = {"time/gc_s": self._total, "time/gc_max_s": self._longest}
            self._total = self._longest = 0.0
        return out
