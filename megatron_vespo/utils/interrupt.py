"""Ctrl-C that a library turned into another error: find it and raise it as what it is."""

from __future__ import annotations

from typing import Optional


def raise_if_interrupted(exc: BaseException) -> None:
    """Raise KeyboardInterrupt (from ``exc``) when one is in ``exc``'s cause/context chain, else return.

    anyio (under httpx) answers a KeyboardInterrupt inside a cancel scope with a RuntimeError
    whose ``__context__`` is the interrupt; a loop catching rollout errors would then report
    "rollout failed" instead of stopping as interrupted, and the CLI would print a traceback.
    """
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
