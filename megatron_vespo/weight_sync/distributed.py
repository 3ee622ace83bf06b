"""Weight sync by broadcast from training rank 0 to the engines (SGLang ``update_weights_from_distributed``).

Per sync (``push``)::

    all training ranks:  iter_hf_weights(model, dst=0)     # collective: TP/EP/PP gathers, HF names
    rank 0, per bucket:  POST /update_weights_from_distributed {names, dtypes, shapes, group_name,
                              flush_cache=last, weight_version=version if last}   (every engine)
                         broadcast each tensor from group rank 0, in the listed order

The engine starts receiving when the request arrives and answers once it has loaded the bucket,
so rank 0 must not wait for the answer before broadcasting: the requests go out, the broadcasts
are queued as async work (gloo/NCCL threads), then both are awaited. A bucket an engine rejects
after receiving it (unknown name, shape) leaves the group usable; a broadcast that does not
complete (an engine refused the request before receiving) makes rank 0 abandon the group and
re-create it at the next push. Rank 0 finishes iterating the export even after a failure (the
other ranks are inside its collectives) and then every rank raises the same error.

The group (1 + sum of engine TP sizes ranks, trainer = rank 0, engine e at ``rank_offset`` =
1 + the TP sizes of engines before it) is created on first use: ``/init_weights_update_group``
goes to every engine concurrently while rank 0 hosts the rendezvous (``group.TrainerGroup``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Optional, Sequence

import torch

from megatron_vespo.rollout.client import RolloutEngineError
from megatron_vespo.weight_sync.config import WeightSyncConfig
from megatron_vespo.weight_sync.group import TrainerGroup, dtype_name, master_address_for, resolve_backend, with_last
from megatron_vespo.weight_sync.tensor import aligned_order

logger = logging.getLogger(__name__)

Run = Callable[[Awaitable[Any]], Any]


def _in_thread(fn: Callable[[], Any]) -> "asyncio.Future[Any]":
    """Run blocking ``fn`` on a daemon thread (an abandoned rendezvous must not block interpreter exit)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def target() -> None:
        try:
            res, exc = fn(), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            res, exc = None, e
        if not loop.is_closed():
            loop.call_soon_threadsafe(lambda: fut.done() or (fut.set_exception(exc) if exc else fut.set_result(res)))

    threading.Thread(target=target, name="weight-sync-wait", daemon=True).start()
    return fut


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _share_error(error: Optional[str]) -> None:
    """Collective: raise on every rank when rank 0 recorded an error."""
    box = [error]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RolloutEngineError(f"distributed weight sync failed: {box[0]}")


class DistributedWeightSync:
    """Broadcast weights from training rank 0 into running engines over a dedicated process group.

    Args:
        hf_cfg: the model's HF config (mapping dims).
        cfg: ``WeightSyncConfig`` (backend, bucket size, export dtype, address, timeouts).
    """

    def __init__(self, hf_cfg: Any, cfg: Optional[WeightSyncConfig] = None) -> None:
        from megatron_vespo.checkpoint.export import as_dims

        self.dims, self.cfg = as_dims(hf_cfg), cfg or WeightSyncConfig()
        self.backend = resolve_backend(self.cfg.backend)
        self.group: Optional[TrainerGroup] = None
        self.clients: list[Any] = []
        self.rank_offsets: list[int] = []

    # ------------------------------------------------------------------ group (rank 0)
    async def _engine_tp_sizes(self, clients: Sequence[Any]) -> list[int]:
        infos = await asyncio.gather(*[c.server_info() for c in clients])
        sizes = []
        for c, info in zip(clients, infos):
            if int(info.get("dp_size") or 1) > 1 or int(info.get("pp_size") or 1) > 1:
                raise ValueError(f"{c.url}: engines with dp_size/pp_size > 1 are not supported by the distributed "
                                 "weight sync (one group rank per engine TP rank)")
            sizes.append(int(info.get("tp_size") or 1))
        return sizes

    def connect(self, clients: Sequence[Any], run: Run) -> float:
        """Create the group with every engine (rank 0 only); returns the seconds it took.

        Raises ``RolloutEngineError`` naming the engine URL when an engine refuses or cannot be
        reached, ``TimeoutError`` when the group does not form within ``init_timeout_s``.
        """
        t0 = time.perf_counter()
        if self.group is not None:
            self.disconnect(run)
        clients = list(clients)
        sizes = run(self._engine_tp_sizes(clients))
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        address = self.cfg.master_address or master_address_for([c.url for c in clients])
        group = TrainerGroup(self.backend, 1 + sum(sizes), master_address=address, master_port=self.cfg.master_port,
                             group_name=self.cfg.group_name, init_timeout_s=self.cfg.init_timeout_s,
                             op_timeout_s=self.cfg.op_timeout_s)
        try:
            run(self._rendezvous(group, clients, offsets))
        except BaseException:
            group.abandon()
            raise
        self.group, self.clients, self.rank_offsets = group, clients, offsets
        logger.info("weight-update group %s ready: %s backend, %s:%d, %d ranks", group.group_name, self.backend,
                    address, group.port, group.world_size)
        return time.perf_counter() - t0

    async def _rendezvous(self, group: TrainerGroup, clients: list, offsets: list[int]) -> None:
        name = self.cfg.group_name
        # A group of the same name left over from an earlier (failed) sync would make the init fail.
        await asyncio.gather(*[c.destroy_weights_update_group(name) for c in clients], return_exceptions=True)
        inits = [asyncio.ensure_future(c.init_weights_update_group(group.master_address, group.port, off,
                                                                   group.world_size, name, self.backend))
                 for c, off in zip(clients, offsets)]
        joined = _in_thread(group.connect)
        done, pending = await asyncio.wait([*inits, joined], timeout=self.cfg.init_timeout_s,
                                           return_when=asyncio.FIRST_EXCEPTION)
        for p in pending:
            p.cancel()
        failed = [t for t in inits if t in done and t.exception() is not None]
        if failed:  # an engine refused or was unreachable: its error names its URL
            raise failed[0].exception()
        if pending or joined.exception() is not None:
            waiting = [c.url for c, t in zip(clients, inits) if t in pending]
            raise TimeoutError(f"weight-update group {name!r} did not form within {self.cfg.init_timeout_s}s: the "
                               f"trainer at {group.master_address}:{group.port} waited for {group.world_size - 1} "
                               f"engine rank(s) (requests still open: {waiting or 'none'}; rendezvous: "
                               f"{joined.exception() if joined in done else 'still waiting'})")

    def disconnect(self, run: Optional[Run] = None) -> None:
        """Destroy the group on the engines (best effort) and locally (rank 0)."""
        group, self.group = self.group, None
        if group is None:
            return
        if run is not None and self.clients:
            name = self.cfg.group_name

            async def destroy() -> list:
                return await asyncio.gather(*[c.destroy_weights_update_group(name) for c in self.clients],
                                            return_exceptions=True)
            results = run(destroy())
            for c, r in zip(self.clients, results):
                if isinstance(r, BaseException):
                    logger.warning("destroy_weights_update_group on %s failed: %s", c.url, r)
        group.close()

    # ------------------------------------------------------------------ one bucket (rank 0)
    def send_bucket(self, named_tensors: Sequence[tuple[str, torch.Tensor]], run: Run, *,
                    version: Optional[int] = None, flush_cache: bool = False) -> None:
        """POST one bucket's metadata to every engine and broadcast its tensors (rank 0).

        ``version`` (the last bucket of a sync) tags the engines' weights. Raises
        ``RolloutEngineError`` with the engines' messages when one rejects the bucket.
        """
        if self.group is None:
            raise RuntimeError("weight-update group not connected: call connect() first")
        if self.cfg.flattened_bucket:  # packed byte offsets must stay aligned for the engine's dtype views
            named_tensors = aligned_order(named_tensors)
        names = [n for n, _ in named_tensors]
        tensors = [t.detach().contiguous() for _, t in named_tensors]
        dtypes, shapes = [dtype_name(t.dtype) for t in tensors], [list(t.shape) for t in tensors]
        load_format = None
        if self.cfg.flattened_bucket:
            tensors, load_format = [torch.cat([t.view(-1).view(torch.uint8) for t in tensors])], "flattened_bucket"
        if self.backend == "nccl":
            tensors = [t.cuda(non_blocking=True) for t in tensors]
        run(self._send(self.group, names, dtypes, shapes, tensors, version, flush_cache, load_format))

    async def _send(self, group: TrainerGroup, names: list, dtypes: list, shapes: list, tensors: list,
                    version: Optional[int], flush_cache: bool, load_format: Optional[str]) -> None:
        posts = [asyncio.ensure_future(c.update_weights_from_distributed(
            names, dtypes, shapes, version, group_name=self.cfg.group_name, flush_cache=flush_cache,
            load_format=load_format)) for c in self.clients]
        await asyncio.sleep(0)  # let the requests start before the broadcasts are queued
        works = group.broadcast(tensors)
        sent = _in_thread(lambda: group.wait(works))
        results = await asyncio.gather(*posts, return_exceptions=True)
        errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        try:
            # an engine that answered without receiving leaves our broadcast pending: give up on it soon
            await asyncio.wait_for(asyncio.shield(sent), timeout=10.0 if errors else self.cfg.op_timeout_s)
        except (asyncio.TimeoutError, RuntimeError) as exc:
            if self.group is group:
                self.group = None
            group.abandon()
            errors.append(f"broadcast to the engines did not complete ({type(exc).__name__}: {exc}); "
                          "the group is re-created at the next sync")
        if errors:
            raise RolloutEngineError("; ".join(errors))

    # ------------------------------------------------------------------ a whole sync (collective)
    @torch.no_grad()
    def push(self, model: Any, version: int, clients: Optional[Sequence[Any]] = None,
             run: Optional[Run] = None) -> dict[str, float]:
        """Collective over the training ranks: export the model and broadcast it to the engines.

        ``clients`` (``SGLangClient`` objects) and ``run`` (executes a coroutine) are needed on
        rank 0 only. Returns timing metrics; raises ``RolloutEngineError`` on every rank if rank
        0 failed.
        """
        from megatron_vespo.checkpoint.export import iter_hf_weights

        rank0 = _rank() == 0
        t0, connect_s, send_s, nbytes, nbuckets = time.perf_counter(), 0.0, 0.0, 0, 0
        error: Optional[str] = None
        if rank0:
            try:  # errors are shared, not raised here: the other ranks are about to enter collectives
                if clients is None or run is None:
                    raise ValueError("DistributedWeightSync.push needs clients= and run= on rank 0")
                if self.group is None or list(clients) != self.clients:
                    connect_s = self.connect(clients, run)
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                error = f"{type(exc).__name__}: {exc}"
        _share_error(error)
        buckets = iter_hf_weights(model, self.dims, bucket_bytes=self.cfg.bucket_bytes, dtype=self.cfg.export_dtype,
                                  dst=0)
        for bucket, last in with_last(buckets):
            if not rank0 or error is not None:
                continue  # keep iterating: the other ranks are in the export's collectives
            ts = time.perf_counter()
            try:
                self.send_bucket(bucket, run, version=version if last else None, flush_cache=last)
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
            send_s += time.perf_counter() - ts
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            nbuckets += 1
        _share_error(error)
        total = time.perf_counter() - t0
        return {"weight_sync/total_s": total, "weight_sync/connect_s": connect_s, "weight_sync/send_s": send_s,
                "weight_sync/export_s": total - connect_s - send_s, "weight_sync/bytes": float(nbytes),
                "weight_sync/buckets": float(nbuckets)}
