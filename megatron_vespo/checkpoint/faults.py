"""Fault injection: named kill points that make the process ``SIGKILL`` itself (tests only).

The kill-and-resume tests (``tests/faults/``) must stop a run at an exact place -- after the
checkpoint directory was renamed but before the pointer moved, after iteration ``k`` trained --
not "about 3 seconds in". A timer would hit a different line on a loaded machine; a kill point
hits the same one every time. Set::

    MEGATRON_VESPO_FAULT=ckpt_renamed@3            # die right after iter_0000003 was renamed
    MEGATRON_VESPO_FAULT=trained@2,ckpt_saved@4    # several points: the first one reached fires

and the process sends itself ``SIGKILL`` (the same signal as ``kill -9``: no ``finally``, no
``atexit``, no flush) when it reaches that point at that iteration (``name`` alone: at any
iteration). Unset (every real run), :func:`fault_point` is one environment lookup.

Kill points (``KILL_POINTS``), in the order a save passes them:

* ``trained``: the iteration's optimizer updates are done, the weights not yet synced;
* ``ckpt_written``: every file of the checkpoint is in its ``.partial`` directory, not renamed;
* ``ckpt_renamed``: ``iter_XXXXXXX`` exists, ``latest_checkpointed_iteration.txt`` not moved;
* ``pointer_tmp``: the new pointer is written to its ``.tmp`` file, not renamed over the old one;
* ``ckpt_saved``: the pointer moved and old iterations were rotated out.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional

logger = logging.getLogger(__name__)

ENV = "MEGATRON_VESPO_FAULT"
KILL_POINTS = ("trained", "ckpt_written", "ckpt_renamed", "pointer_tmp", "ckpt_saved")


def _parse(spec: str) -> list[tuple[str, Optional[int]]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, it = item.partition("@")
        if name not in KILL_POINTS or (it and not it.isdigit()):
            raise ValueError(f"{ENV}={spec!r}: {item!r} is not POINT or POINT@ITERATION with POINT one of "
                             f"{', '.join(KILL_POINTS)}")
        out.append((name, int(it) if it else None))
    return out


def fault_point(name: str, iteration: Optional[int] = None) -> None:
    """``SIGKILL`` this process if ``$MEGATRON_VESPO_FAULT`` names ``name`` (at ``iteration``)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if name not in KILL_POINTS:
        raise ValueError(f"unknown kill point {name!r}")
    for point, it in _parse(spec):
        if point == name and (it is None or it == iteration):
            logger.warning("fault injection: %s=%s reached %s at iteration %s; sending SIGKILL to pid %d",
                           ENV, spec, name, iteration, os.getpid())
            for h in logging.getLogger().handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)
