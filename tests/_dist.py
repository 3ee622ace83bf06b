"""Run a function on N local processes joined in a gloo group, for multi-process CPU tests.

Usage (from any test; ``tests/`` is on ``sys.path`` through ``tests/conftest.py``)::

    from _dist import run_distributed

    def _check(rank, world_size, scale):        # top-level, so it pickles by reference
        t = torch.full((1,), float(rank))
        torch.distributed.all_reduce(t)
        return float(t) * scale

    assert run_distributed(_check, 2, scale=2.0) == [2.0, 2.0]

Each rank runs ``fn(rank, world_size, *args, **kwargs)`` in a fresh ``spawn`` process with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set (free port) and,
unless ``init_gloo=False``, ``torch.distributed`` already initialised with gloo (destroyed
afterwards). Results come back per rank (serialised with ``torch.save``, so tensors are
fine). An exception on any rank raises ``DistributedTestError`` carrying every failing
rank's traceback; a hang raises it after ``timeout`` seconds. Only the processes started
here are ever terminated.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable

import torch

from megatron_vespo.utils.net import free_port


class DistributedTestError(RuntimeError):
    """One or more ranks failed (message holds their tracebacks) or the run timed out."""


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _worker(fn: Callable, rank: int, world_size: int, port: int, args: tuple, kwargs: dict,
            results: Any, threads: int, init_gloo: bool, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    try:
        if init_gloo:
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, _dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if init_gloo and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # noqa: BLE001 - the result is already reported
                pass


def run_distributed(fn: Callable, world_size: int = 2, *args: Any, timeout: float = 300.0, threads: int = 1,
                    init_gloo: bool = True, env: dict[str, str] | None = None, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; return per-rank results.

    Args:
        fn: a picklable top-level function.
        world_size: number of processes.
        timeout: seconds before the run is declared hung and its processes terminated.
        threads: ``torch.set_num_threads`` in each process (1: the machine is shared).
        init_gloo: initialise ``torch.distributed`` with gloo before calling ``fn``.
        env: extra environment variables for the workers (e.g. ``{"OMP_NUM_THREADS": "1"}``).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env = {"OMP_NUM_THREADS": str(threads), **(env or {})}
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, kwargs, results, threads,
                                               init_gloo, env), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedTestError(_timeout_message(fn, timeout, outs, errors, procs))
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in outs and r not in errors]
                for r in dead:  # killed by a signal / os._exit before reporting
                    errors[r] = f"process exited with code {procs[r].exitcode} without reporting"
                if errors and any(p.is_alive() for p in procs):
                    # a peer is probably blocked in a collective with the failed rank: give it
                    # a few seconds to report its own error, then stop waiting
                    deadline = min(deadline, time.monotonic() + 10.0)
                continue
            if ok:
                outs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + 10.0)
    finally:
        for p in procs:
            p.join(timeout=5.0)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
    if errors:
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise DistributedTestError(f"{getattr(fn, '__name__', fn)} failed on rank(s) {sorted(errors)}:\n{details}")
    return [outs[r] for r in range(world_size)]


def _timeout_message(fn: Callable, timeout: float, outs: dict, errors: dict, procs: list) -> str:
    pending = [r for r in range(len(procs)) if r not in outs and r not in errors]
    msg = f"{getattr(fn, '__name__', fn)} timed out after {timeout:.0f}s; ranks still running: {pending}"
    if errors:
        msg += "\n" + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
    return msg


def tagged_pids(var: str, tag: str) -> list[int]:
    """PIDs of live processes whose environment holds ``var=tag`` (children inherit it: a test's own processes)."""
    from pathlib import Path

    needle = f"{var}={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:  # gone, or not ours
                continue
    return pids
