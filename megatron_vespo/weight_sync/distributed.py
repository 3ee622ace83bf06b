"""Weight sync by broadcast from training rank 0 to the engines (SGLang ``update_weights_from_distributed``).

Per sync (``push``)::

    rank 0:              POST /begin_weight_update                     (every engine, sglang >= 0.5.21)
    all training ranks:  iter_hf_weights(model, dst=0)     # collective: TP/EP/PP gathers, HF names
    rank 0, per bucket:  POST /update_weights_from_distributed {names, dtypes, shapes, group_name,
                              load_format="flattened_bucket", flush_cache=last,
                              weight_version=version if last}          (every engine)
                         broadcast the bucket (one flat uint8 tensor) from group rank 0
    rank 0:              POST /end_weight_update                       (every engine)

Three threads on rank 0 (``channel.py``): the main thread exports (its collectives over the
training group) and packs bucket k+1 while bucket k is on the wire; the HTTP calls go out from
``EngineChannel``'s own event loop; the broadcasts run on ``CollectiveThread``. NCCL forms the
communicator inside the first broadcast and blocks that thread until the engines join, and the
engines join only when they receive the first bucket's request -- so the requests must never wait
behind a collective (they did before: a deadlock on NCCL). The engine answers a request once it
has loaded the bucket; a bucket an engine rejects after receiving it (unknown name, shape) leaves
the group usable; a broadcast that does not complete (an engine refused the request before
receiving, e.g. no open window) makes rank 0 abandon the group and re-create it at the next push.
Rank 0 finishes iterating the export even after a failure (the other ranks are inside its
collectives), closes the windows it opened, and then every rank raises the same error.

The group (1 + sum of engine TP sizes ranks, trainer = rank 0, engine e at ``rank_offset`` =
1 + the TP sizes of engines before it) is created on first use (:meth:`connect`):
``/init_weights_update_group`` goes to every engine while rank 0 hosts the rendezvous
(``group.TrainerGroup``). Set-up is explicit in two steps: ``connect`` (store rendezvous; gloo
connects here) and the first broadcast (NCCL's communicator; ``TrainerGroup.formed``), which
gets ``init_timeout_s`` on top of ``op_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence

import torch

from megatron_vespo.rollout.client import RolloutEngineError
from megatron_vespo.weight_sync.channel import CollectiveThread, EngineChannel, wait_all
from megatron_vespo.weight_sync.config import WeightSyncConfig
from megatron_vespo.weight_sync.group import TrainerGroup, master_address_for, resolve_backend, with_last
from megatron_vespo.wire import aligned_order, dtype_name

logger = logging.getLogger(__name__)

Run = Callable[[Awaitable[Any]], Any]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _share_error(error: Optional[str]) -> None:
    """Collective: raise on every rank when rank 0 recorded an error."""
    box = [error]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RolloutEngineError(f"distributed weight sync failed: {box[0]}")


def _errors(results: Sequence[Any], urls: Sequence[str]) -> list[str]:
    return [f"{u}: {type(r).__name__}: {r}" if str(u) not in str(r) else f"{type(r).__name__}: {r}"
            for u, r in zip(urls, results) if isinstance(r, BaseException)]


@dataclass
class _Bucket:
    """One packed bucket: request metadata and the tensors to broadcast."""

    names: list
    dtypes: list
    shapes: list
    tensors: list
    load_format: Optional[str]
    nbytes: int
    ready: Any = None  # CUDA event recorded after packing (the broadcast runs on another thread's stream)


@dataclass
class _InFlight:
    group: TrainerGroup
    posts: list
    sent: Any
    first: bool


class DistributedWeightSync:
    """Broadcast weights from training rank 0 into running engines over a dedicated process group.

    Args:
        hf_cfg: the model's HF config (mapping dims).
        cfg: ``WeightSyncConfig`` (backend, bucket size, export dtype, address, timeouts).
    """

    def __init__(self, hf_cfg: Any, cfg: Optional[WeightSyncConfig] = None) -> None:
        from megatron_vespo.checkpoint.hf_weights import as_dims

        self.dims, self.cfg = as_dims(hf_cfg), cfg or WeightSyncConfig()
        self.backend = resolve_backend(self.cfg.backend)
        self.group: Optional[TrainerGroup] = None
        self.channel: Optional[EngineChannel] = None
        self.collectives: Optional[CollectiveThread] = None
        self.rank_offsets: list[int] = []
        self.windows: list[bool] = []  # per engine: a window is open (this sync opened it)

    @property
    def clients(self) -> list[Any]:
        """The channel's engine clients (empty before ``connect``)."""
        return self.channel.clients if self.channel is not None else []

    # ------------------------------------------------------------------ group (rank 0)
    def connect(self, clients: Sequence[Any], run: Optional[Run] = None) -> float:
        """Create the group with every engine (rank 0 only); returns the seconds it took.

        ``run`` (optional) keeps the caller's event loop turning while it waits. Raises
        ``RolloutEngineError`` naming the engine URL when an engine refuses or cannot be reached,
        ``TimeoutError`` when the group does not form within ``init_timeout_s``.
        """
        t0 = time.perf_counter()
        if self.group is not None or self.channel is not None:
            self.disconnect(run)
        channel = EngineChannel(list(clients))
        try:
            infos = wait_all(channel.each(lambda c: c.server_info()), self.cfg.init_timeout_s, run)
            for r in infos:
                if isinstance(r, BaseException):
                    raise r
            sizes = []
            for url, info in zip(channel.urls, infos):
                if int(info.get("dp_size") or 1) > 1 or int(info.get("pp_size") or 1) > 1:
                    raise ValueError(f"{url}: engines with dp_size/pp_size > 1 are not supported by the distributed "
                                     "weight sync (one group rank per engine TP rank)")
                sizes.append(int(info.get("tp_size") or 1))
            offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
            address = self.cfg.master_address or master_address_for(channel.urls)
            group = TrainerGroup(self.backend, 1 + sum(sizes), master_address=address,
                                 master_port=self.cfg.master_port, group_name=self.cfg.group_name,
                                 init_timeout_s=self.cfg.init_timeout_s, op_timeout_s=self.cfg.op_timeout_s)
            collectives = CollectiveThread(torch.device("cuda", torch.cuda.current_device())
                                           if self.backend == "nccl" else None)
            try:
                self._rendezvous(group, channel, collectives, offsets, run)
            except BaseException:
                group.abandon()
                collectives.close()
                raise
        except BaseException:
            channel.close()
            raise
        self.group, self.channel, self.collectives, self.rank_offsets = group, channel, collectives, offsets
        logger.info("weight-update group %s ready: %s backend, %s:%d, %d ranks%s", group.group_name, self.backend,
                    address, group.port, group.world_size,
                    "" if group.formed else " (NCCL communicator forms in the first broadcast)")
        return time.perf_counter() - t0

    def _rendezvous(self, group: TrainerGroup, channel: EngineChannel, collectives: CollectiveThread,
                    offsets: list[int], run: Optional[Run]) -> None:
        name = self.cfg.group_name
        # A group of the same name left over from an earlier (failed) sync would make the init fail.
        wait_all(channel.each(lambda c: c.destroy_weights_update_group(name)), 30.0, run)
        inits = [channel.submit(c.init_weights_update_group(group.master_address, group.port, off,
                                                            group.world_size, name, self.backend))
                 for c, off in zip(channel.clients, offsets)]
        joined = collectives.submit(group.connect)  # gloo: waits for every engine rank; nccl: returns at once
        results = wait_all([*inits, joined], self.cfg.init_timeout_s, run, first_exception=True)
        failed = [r for f, r in zip(inits, results) if f.done() and isinstance(r, BaseException)]
        if failed:  # an engine refused or was unreachable: its error names its URL
            raise failed[0]
        if any(isinstance(r, BaseException) for r in results):
            waiting = [u for u, f in zip(channel.urls, inits) if not f.done()]
            raise TimeoutError(f"weight-update group {name!r} did not form within {self.cfg.init_timeout_s}s: the "
                               f"trainer at {group.master_address}:{group.port} waited for {group.world_size - 1} "
                               f"engine rank(s) (requests still open: {waiting or 'none'}; rendezvous: "
                               f"{results[-1] if joined.done() else 'still waiting'})")

    def disconnect(self, run: Optional[Run] = None) -> None:
        """Destroy the group on the engines (best effort) and locally (rank 0)."""
        group, self.group = self.group, None
        channel, self.channel = self.channel, None
        collectives, self.collectives = self.collectives, None
        if channel is not None:
            if group is not None:
                name = self.cfg.group_name
                results = wait_all(channel.each(lambda c: c.destroy_weights_update_group(name)), 30.0, run)
                for e in _errors(results, channel.urls):
                    logger.warning("destroy_weights_update_group failed: %s", e)
            channel.close()
        if group is not None:
            group.close()
        if collectives is not None:
            collectives.close()

    # ------------------------------------------------------------------ windows (rank 0)
    def open_windows(self, run: Optional[Run] = None) -> None:
        """``/begin_weight_update`` on every engine that has windows (sglang >= 0.5.21).

        Raises ``RolloutEngineError`` (after closing the windows that did open) when one fails.
        """
        if self.channel is None:
            raise RuntimeError("weight-update group not connected: call connect() first")
        results = wait_all(self.channel.each(lambda c: c.begin_weight_update()), self.cfg.op_timeout_s, run)
        self.windows = [r is True for r in results]
        errors = _errors(results, self.channel.urls)
        if errors:
            self.close_windows(run)
            raise RolloutEngineError("opening the weight-update window failed: " + "; ".join(errors))

    def close_windows(self, run: Optional[Run] = None) -> None:
        """``/end_weight_update`` on every engine whose window ``open_windows`` opened."""
        opened, self.windows = self.windows, []
        if self.channel is None or not any(opened):
            return
        futs = [self.channel.submit(c.end_weight_update()) for c, o in zip(self.channel.clients, opened) if o]
        errors = _errors(wait_all(futs, self.cfg.op_timeout_s, run),
                         [u for u, o in zip(self.channel.urls, opened) if o])
        if errors:
            raise RolloutEngineError("closing the weight-update window failed: " + "; ".join(errors))

    # ------------------------------------------------------------------ one bucket (rank 0)
    def pack(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> _Bucket:
        """Request metadata and broadcast tensors of one bucket (flattened unless disabled)."""
        flat = self.cfg.flattened_bucket
        if flat:  # packed byte offsets must stay aligned for the engine's dtype views
            named_tensors = aligned_order(named_tensors)
        names = [n for n, _ in named_tensors]
        tensors = [t.detach().contiguous() for _, t in named_tensors]
        dtypes, shapes = [dtype_name(t.dtype) for t in tensors], [list(t.shape) for t in tensors]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if flat:
            tensors = [torch.cat([t.view(-1).view(torch.uint8) for t in tensors])]
        ready = None
        if self.backend == "nccl":
            tensors = [t.cuda(non_blocking=True) for t in tensors]
            ready = torch.cuda.Event()
            ready.record()
        return _Bucket(names, dtypes, shapes, tensors, "flattened_bucket" if flat else None, nbytes, ready)

    def start(self, bucket: _Bucket, *, version: Optional[int] = None, flush_cache: bool = False) -> _InFlight:
        """Send ``bucket``'s request to every engine and queue its broadcast; returns at once."""
        group = self.group
        if group is None or self.channel is None or self.collectives is None:
            raise RuntimeError("weight-update group not connected: call connect() first")
        posts = self.channel.each(lambda c: c.update_weights_from_distributed(
            bucket.names, bucket.dtypes, bucket.shapes, version, group_name=self.cfg.group_name,
            flush_cache=flush_cache, load_format=bucket.load_format))
        first = not group.formed
        if first:
            logger.info("first broadcast on %s: the engines join its communicator as they receive this request",
                        group.group_name)
        def send() -> None:
            if bucket.ready is not None:  # order after the packing kernels of the exporting thread's stream
                torch.cuda.current_stream().wait_event(bucket.ready)
            group.wait(group.broadcast(bucket.tensors))
        sent = self.collectives.submit(send)
        return _InFlight(group, posts, sent, first)

    def finish(self, f: _InFlight, run: Optional[Run] = None) -> None:
        """Wait for ``f``'s answers and broadcast; ``RolloutEngineError`` with the engines' messages."""
        assert self.channel is not None
        urls = self.channel.urls
        slack = self.cfg.init_timeout_s if f.first else 0.0
        errors = _errors(wait_all(f.posts, self.cfg.op_timeout_s + slack, run), urls)
        # an engine that answered without receiving leaves our broadcast pending: give up on it soon
        sent = wait_all([f.sent], 10.0 if errors else self.cfg.op_timeout_s + slack, run)[0]
        if isinstance(sent, BaseException):
            if self.group is f.group:
                self.group = None
                if self.collectives is not None:
                    self.collectives.close()  # it may be stuck in the broadcast; the next group gets a new one
                    self.collectives = None
            f.group.abandon()
            errors.append(f"broadcast to the engines did not complete ({type(sent).__name__}: {sent}); "
                          "the group is re-created at the next sync")
        elif f.first:
            f.group.formed = True
        if errors:
            raise RolloutEngineError("; ".join(errors))

    def send_bucket(self, named_tensors: Sequence[tuple[str, torch.Tensor]], run: Optional[Run] = None, *,
                    version: Optional[int] = None, flush_cache: bool = False) -> None:
        """POST one bucket's metadata to every engine and broadcast its tensors (rank 0), blocking.

        On sglang >= 0.5.21 call it between :meth:`open_windows` and :meth:`close_windows`.
        ``version`` (the last bucket of a sync) tags the engines' weights. Raises
        ``RolloutEngineError`` with the engines' messages when one rejects the bucket.
        """
        self.finish(self.start(self.pack(named_tensors), version=version, flush_cache=flush_cache), run)

    # ------------------------------------------------------------------ a whole sync (collective)
    @torch.no_grad()
    def push(self, model: Any, version: int, clients: Optional[Sequence[Any]] = None,
             run: Optional[Run] = None) -> dict[str, float]:
        """Collective over the training ranks: export the model and broadcast it to the engines.

        ``clients`` (``SGLangClient`` objects) are needed on rank 0 only (``run``, optional,
        keeps their event loop turning during waits). Export of bucket k+1 overlaps the
        transfer of bucket k. Returns timing metrics; raises ``RolloutEngineError`` on every
        rank if rank 0 failed.
        """
        from megatron_vespo.checkpoint.hf_weights import iter_hf_weights

        rank0 = _rank() == 0
        t0, connect_s, wait_s, nbytes, nbuckets = time.perf_counter(), 0.0, 0.0, 0, 0
        error: Optional[str] = None
        if rank0:
            try:  # errors are shared, not raised here: the other ranks are about to enter collectives
                if clients is None:
                    raise ValueError("DistributedWeightSync.push needs clients= on rank 0")
                if self.group is None or [c.url for c in clients] != (self.channel.urls if self.channel else None):
                    connect_s = self.connect(clients, run)
                self.open_windows(run)
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                error = f"{type(exc).__name__}: {exc}"
        _share_error(error)
        inflight: Optional[_InFlight] = None
        buckets = iter_hf_weights(model, self.dims, bucket_bytes=self.cfg.bucket_bytes, dtype=self.cfg.export_dtype,
                                  dst=0)
        for bucket, last in with_last(buckets):
            if not rank0 or error is not None:
                continue  # keep iterating: the other ranks are in the export's collectives
            try:
                packed = self.pack(bucket)  # while the previous bucket is on the wire
                if inflight is not None:
                    ts, prev, inflight = time.perf_counter(), inflight, None
                    self.finish(prev, run)
                    wait_s += time.perf_counter() - ts
                inflight = self.start(packed, version=version if last else None, flush_cache=last)
                nbytes, nbuckets = nbytes + packed.nbytes, nbuckets + 1
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
        if rank0:
            ts = time.perf_counter()
            error = self._close_push(inflight, error, run, version, clients)
            wait_s += time.perf_counter() - ts
        _share_error(error)
        total = time.perf_counter() - t0
        return {"weight_sync/total_s": total, "weight_sync/connect_s": connect_s, "weight_sync/send_s": wait_s,
                "weight_sync/export_s": total - connect_s - wait_s, "weight_sync/bytes": float(nbytes),
                "weight_sync/buckets": float(nbuckets),
                "weight_sync/bytes_per_s": nbytes / max(total - connect_s, 1e-9)}

    def _close_push(self, inflight: Optional[_InFlight], error: Optional[str], run: Optional[Run], version: int,
                    clients: Optional[Sequence[Any]]) -> Optional[str]:
        """Rank 0: wait for the last bucket, close the windows; the push's error (or None)."""
        if inflight is not None:  # also after a later error: the engines are receiving it
            try:
                self.finish(inflight, run)
            except Exception as exc:  # noqa: BLE001
                error = error or f"{type(exc).__name__}: {exc}"
        try:
            self.close_windows(run)
        except Exception as exc:  # noqa: BLE001
            error = error or f"{type(exc).__name__}: {exc}"
        if error is None:
            for c in clients or []:
                c.policy_version = int(version)  # the loop's clients tag samples with it
        return error
