"""Multi-rank helpers for checkpoint writing: a collective atomic directory and a local launcher.

Every rank writes its part of a distributed checkpoint into one temporary directory chosen by
rank 0; only when every rank reports success is it renamed to its final name. A failure on any
rank removes the temporary directory and raises on every rank, so a final name never points at
a partial checkpoint.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from megatron_vespo.utils.io import make_public_like_mkdir
from megatron_vespo.utils.net import free_port

logger = logging.getLogger(__name__)

#: seconds the surviving ranks get to report their own error after one rank failed
_GRACE_SECONDS = 20.0


def is_initialized() -> bool:
    """True when torch.distributed has a default process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """Global rank (0 without torch.distributed)."""
    return torch.distributed.get_rank() if is_initialized() else 0


def collective_device() -> torch.device:
    """Where tensors for collectives on the default group must live (CUDA for NCCL, else CPU)."""
    if is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Global barrier (no-op without torch.distributed)."""
    if is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` is True on every rank."""
    if not is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=collective_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Raise ValueError unless ``path`` is absent or an empty directory (nothing is overwritten)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{what} {path} already exists and is not empty; choose a new directory")
    return path


@contextmanager
def dist_atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Collective form of ``utils.io.atomic_dir``: all ranks write into one temporary directory.

    Rank 0 creates ``.<name>.XXXX.partial`` next to ``path`` and renames it to ``path`` after every
    rank left the block without an exception. Exceptions inside the block must not leave other
    ranks blocked in a collective (validate inputs before entering). A full disk inside the block
    is raised as ``checkpoint.safety.DiskFullError`` naming ``path`` and its free space.
    """
    path = Path(path)
    tmp = None
    err = None
    if rank() == 0:
        try:
            check_output_dir(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
            make_public_like_mkdir(tmp)  # not mkdtemp's 0700: an engine running as another user reads it
        except (OSError, ValueError) as exc:
            err = str(exc)
    tmp, err = broadcast_object((tmp, err))
    if err:
        raise ValueError(err)
    ok = False
    try:
        yield Path(tmp)
        ok = True
    except Exception as exc:
        from megatron_vespo.checkpoint.safety import DiskFullError, explain_disk_full

        # measured before the cleanup below frees the space: a full disk is named as such
        full = None if isinstance(exc, DiskFullError) else explain_disk_full(exc, path, f"writing {path}")
        if full is None:
            raise
        raise full from exc
    finally:
        everyone = all_ok(ok)
        if rank() == 0:
            if everyone:
                if path.exists():
                    path.rmdir()
                os.replace(tmp, path)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if ok and not everyone:
            raise RuntimeError(f"another rank failed while writing {path}; nothing was written")


# ----------------------------------------------------------------------------- local launcher
def _child(fn: Callable, r: int, world: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        out = fn(*args)
        if r == 0:
            results.put((r, True, out, ""))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-raises
        results.put((r, False, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1) from None


def launch_local(fn: Callable, nproc: int, *args: Any) -> Any:
    """Run ``fn(*args)`` on ``nproc`` local processes and return rank 0's result.

    Ranks find each other through RANK/WORLD_SIZE/MASTER_* env vars (what ``init_process_group``
    reads). With ``nproc == 1``, or inside a launched job (``WORLD_SIZE`` > 1), ``fn`` runs in this
    process. Otherwise ranks are spawned here; the first failing rank's error is re-raised (as
    ValueError when the rank raised one, so bad input keeps its message). ``fn`` and its result
    must pickle.
    """
    if nproc == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # already one rank of a launched job (torchrun / srun set WORLD_SIZE); a leftover
        # WORLD_SIZE=1 from an earlier 1-process group in this process does not count
        return fn(*args)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, nproc, port, args, results)) for r in range(nproc)]
    for p in procs:
        p.start()
    first_failure = None
    while any(p.is_alive() for p in procs):
        for p in procs:
            p.join(timeout=0.5)
        if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
            first_failure = time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > _GRACE_SECONDS:
            # peers of a failed rank may sit in a collective forever: stop the ranks we started
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5.0)
    collected = []
    while True:
        try:
            collected.append(results.get(timeout=0.5))
        except Exception:  # noqa: BLE001 - queue.Empty from the multiprocessing queue
            break
    failures = sorted((r, msg, tb) for r, ok, msg, tb in collected if not ok)
    for r, _, tb in failures:
        logger.debug("rank %d traceback:\n%s", r, tb)
    if failures or any(p.exitcode for p in procs):
        msg = failures[0][1] if failures else f"ranks exited with codes {[p.exitcode for p in procs]}"
        if msg.startswith(("ValueError: ", "ConfigError: ")):
            raise ValueError(msg.split(": ", 1)[1])
        raise RuntimeError(f"rank {failures[0][0] if failures else '?'} failed: {msg}")
    return next((out for r, ok, out, _ in collected if ok and r == 0), None)
