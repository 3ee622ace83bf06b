"""Training rank 0's end of SGLang's weight-update process group.

SGLang's engines join the group in ``/init_weights_update_group`` with
``init_custom_process_group``: a ``tcp://master_address:master_port`` rendezvous (rank 0 hosts
the TCPStore), ``PrefixStore(group_name, store)``, then torch's ``_new_process_group_helper``,
which prefixes the store again with ``"<group_name>/"`` and ``"<device>/"`` (``cpu/`` for gloo,
``cuda/`` for nccl) before building the backend. Engine TP rank j of the engine at
``rank_offset`` is group rank ``rank_offset + j``; the trainer is rank 0.

We build rank 0 directly from the public backend classes (``TCPStore``, ``PrefixStore``,
``ProcessGroupGloo`` / ``ProcessGroupNCCL``) over the same store layout instead of calling the
private helper ourselves: the group then stays out of torch.distributed's registry (so it
cannot clash with the training job's default group, and an engine running in the same process
-- our embedded server in tests -- can register the same group name), and NCCL never tries to
split it from a device-bound default group (the helper does that when the default group has a
``bound_device_id``, which would hang an external group). ``tests/weight_sync`` joins this
rank 0 with the exact SGLang-side construction.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Any, Iterable, Iterator, Optional, Sequence, TypeVar
from urllib.parse import urlparse

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
_ABANDONED: list[Any] = []  # groups with a broadcast that never completed: never garbage-collected (see abandon)


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """``(item, is_last)`` with a one-item look-ahead (the last bucket of a sync carries its version)."""
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``nccl`` with CUDA, else ``gloo``; validates the name."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"weight_sync.backend must be auto, nccl or gloo, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("weight_sync.backend=nccl needs CUDA; use gloo on a CPU machine")
    return backend


def master_address_for(urls: Sequence[str]) -> str:
    """Address the engines can reach training rank 0 at: loopback when every engine is local,
    else the local address of the interface that routes to the first engine (set
    ``weight_sync.master_address`` when that is not the one the engines should use)."""
    hosts = [urlparse(u).hostname or "" for u in urls]
    if all(h in _LOOPBACK or h.startswith("127.") for h in hosts):
        return "127.0.0.1"
    remote = next(h for h in hosts if h not in _LOOPBACK and not h.startswith("127."))
    try:
        # connect() on a UDP socket only picks the route; no packet is sent
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((socket.gethostbyname(remote), 9))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


class TrainerGroup:
    """Rank 0 of a ``world_size``-process weight-broadcast group.

    ``__init__`` starts the TCPStore (non-blocking; ``port`` is then known, port 0 = a free
    one); :meth:`connect` builds the backend and blocks until every engine rank has joined
    (gloo) or returns at once (nccl connects lazily on the first broadcast, ``formed`` tells);
    :meth:`broadcast` starts broadcasts from rank 0 and returns their work handles. Call both
    from a thread that sends no engine request (``channel.CollectiveThread``): they can block.
    """

    def __init__(self, backend: str, world_size: int, *, master_address: str, master_port: int = 0,
                 group_name: str = "weight_update_group", init_timeout_s: float = 300.0,
                 op_timeout_s: float = 600.0) -> None:
        if world_size < 2:
            raise ValueError(f"a weight-update group needs the trainer and >= 1 engine rank, "
                             f"got world_size={world_size}")
        self.backend = resolve_backend(backend)
        self.world_size, self.group_name, self.master_address = world_size, group_name, master_address
        self.op_timeout = timedelta(seconds=op_timeout_s)
        # the store outlives the caller's init_timeout_s a little, so that timeout is the one reported
        self.store = torch.distributed.TCPStore(master_address, master_port, world_size, True,
                                                timedelta(seconds=init_timeout_s + 5), wait_for_workers=False)
        self.port = int(self.store.port)
        self.pg: Optional[Any] = None
        # every rank connected: gloo in connect(); NCCL only inside the first broadcast, which the
        # engines join when they receive the first bucket's request (sglang's init_custom_process_group
        # passes no device_id, so its communicator is lazy too)
        self.formed = False

    def _prefixed_store(self) -> Any:
        prefix = torch.distributed.PrefixStore
        device = "cuda" if self.backend == "nccl" else "cpu"
        return prefix(f"{device}/", prefix(f"{self.group_name}/", prefix(self.group_name, self.store)))

    def connect(self) -> None:
        """Build rank 0's backend; for gloo this waits for every engine rank (store timeout)."""
        store = self._prefixed_store()
        if self.backend == "gloo":
            self.pg = torch.distributed.ProcessGroupGloo(store, 0, self.world_size, self.op_timeout)
        else:
            opts = torch.distributed.ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = False
            opts._timeout = self.op_timeout
            self.pg = torch.distributed.ProcessGroupNCCL(store, 0, self.world_size, opts)
        self.store.set_timeout(self.op_timeout)
        self.formed = self.backend == "gloo"

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> list[Any]:
        """Start one broadcast from rank 0 per tensor, in order; returns the work handles."""
        if self.pg is None:
            raise RuntimeError("TrainerGroup.connect() has not completed")
        works = []
        for t in tensors:
            opts = torch.distributed.BroadcastOptions()
            opts.rootRank, opts.rootTensor = 0, 0
            t = t.contiguous()
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # gloo has no float8: send the same bytes
                t = t.view(torch.uint8)
            works.append(self.pg.broadcast([t], opts))
        return works

    def wait(self, works: Sequence[Any]) -> None:
        """Block until ``works`` completed (raises on the backend's op timeout)."""
        for w in works:
            w.wait()
        if self.backend == "nccl":  # NCCL's wait only orders the current stream; the caller frees buffers next
            torch.cuda.current_stream().synchronize()

    def abandon(self) -> None:
        """Forget a group whose collectives are out of step (a failed send). Its backend is kept
        referenced forever: destroying a gloo group with a pending broadcast blocks until its timeout."""
        if self.pg is not None:
            _ABANDONED.append(self.pg)
        self.pg = None

    def close(self) -> None:
        """Release the backend and the store."""
        pg, self.pg = self.pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - best effort; the engines destroy their side separately
                logger.debug("weight-update group shutdown failed", exc_info=True)
        self.store = None
