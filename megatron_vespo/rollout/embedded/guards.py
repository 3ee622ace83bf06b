"""Guards of the embedded server: a disconnected client's requests and a dead parent do not linger.

* :func:`abort_on_disconnect` aborts a ``/generate`` call's requests once its HTTP client has
  gone away (SGLang's ``TokenizerManager._wait_one_response`` does the same with
  ``request.is_disconnected()``): 20 clients that hang up must not keep the engine busy.
* :func:`watch_parent` exits the server once the run that started it is gone (second line
  behind the parent-death signal ``rollout/process.py`` sets).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)


async def abort_on_disconnect(engine: Any, request: Any, reqs: list, interval_s: float = 0.1) -> None:
    """Abort ``reqs`` once the HTTP client of ``request`` has gone away (SGLang does the same:
    ``TokenizerManager._wait_one_response`` checks ``request.is_disconnected()`` and aborts the rid).

    Without it a disconnected client keeps its request generating to ``max_new_tokens``.
    """
    while not all(r.is_done for r in reqs):
        if await request.is_disconnected():
            logger.info("client disconnected: aborting %d request(s)", len(reqs))
            for r in reqs:
                if not r.is_done:
                    engine.abort(r.rid, message="client disconnected")
            return
        await asyncio.sleep(interval_s)


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> threading.Thread:
    """Exit this process (code 1) once ``parent_pid`` is no longer our parent (it died; we were reparented).

    A second line behind the parent-death signal set by ``ServerProcess``: that signal is tied
    to the thread that forked us, this watch to the process.
    """
    def run() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        logger.error("parent process %d is gone: embedded server exiting", parent_pid)
        logging.shutdown()
        os._exit(1)  # no graceful drain: the run that wanted these answers is dead
    thread = threading.Thread(target=run, name="parent-watch", daemon=True)
    thread.start()
    return thread
