"""Weight sync to colocated engines through ``/update_weights_from_tensor`` (CUDA IPC on GPU).

Payload, as sglang 0.5.23 reads it (``model_runner_components/weight_updater.py``,
``weight_sync/tensor_bucket.py``): ``serialized_named_tensors`` holds one string per engine TP
rank, each ``base64(ForkingPickler.dumps(obj))`` (``MultiprocessingSerializer.serialize(obj,
output_str=True)``). With ``load_format="flattened_bucket"`` (what we send), ``obj`` is
``{"flattened_tensor": uint8[total_bytes], "metadata": [m, ...]}`` where each ``m`` has
``name, shape, dtype, start_idx, end_idx, numel`` in bytes of the flat tensor, and the engine
rebuilds ``flat[start:end].view(dtype).reshape(shape)``. SGLang's allowlist unpickler accepts
its own ``FlattenedTensorMetadata`` and ``types.SimpleNamespace``; we use the former when
sglang is importable (colocated jobs usually have it) and the latter otherwise. A CUDA tensor
pickles as an IPC handle: the engine maps the trainer's memory, so the trainer keeps the bucket
alive until the engine has answered. sglang >= 0.5.21 refuses the call outside a weight-update
window, so rank 0 opens one per engine (``/begin_weight_update``) before the first bucket and
closes it after the last (``SGLangClient.begin_weight_update`` detects older servers).
A CPU tensor pickles as a named shared-memory file
(``/dev/shm``), which is how the embedded engine exercises this path on CPU.

Layout: colocated engine ``e`` with TP size T runs on the GPUs of training ranks ``e*T ..
e*T+T-1``; each training rank serializes its own copy of the bucket and rank 0 (the only rank
with engine clients) posts every engine its T payloads.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any, Awaitable, Callable, Optional, Sequence

import torch

from megatron_vespo.weight_sync.config import WeightSyncConfig
from megatron_vespo.weight_sync.group import with_last
from megatron_vespo.weight_sync.staging import BucketStaging
from megatron_vespo.wire import flattened_bucket

logger = logging.getLogger(__name__)


def serialize(obj: Any) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``.

    With sglang importable its torch-reduction patch is applied first so CUDA tensors carry the
    device UUID (what its deserializer maps back to a local device index).
    """
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()
    except Exception:  # noqa: BLE001 - plain torch reductions (device index) otherwise
        pass
    buf = io.BytesIO()
    # CPU tensors: share by /dev/shm file name, not by file descriptor -- passing a descriptor goes
    # through multiprocessing's resource sharer, which only answers processes holding our authkey
    # (our children), not an engine started separately. CUDA tensors are IPC handles either way.
    strategy = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        ForkingPickler(buf).dump(obj)
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class StagedWeights:
    """One version's buckets staged by :meth:`TensorWeightSync.stage`.

    ``payloads[b][r]``: bucket ``b``'s ``serialized_named_tensors`` entry of training rank ``r``
    (base64 strings, a few hundred bytes each: handles of shared memory), rank 0 only (None
    elsewhere); ``nbytes``: this rank's bytes; ``stage_s``: seconds the staging took.
    """

    payloads: Optional[list[list[str]]]
    nbytes: int
    stage_s: float


@dataclass
class _ViewPlan:
    """One process: each staged tensor's buffer view paired with the view of the parameter it comes from.

    Built after a full staging (``iter_hf_weights`` + ``BucketStaging.pack``), when every staged
    tensor is exactly a view of one parameter (``hf_weights.hf_source_views``: unsharded, no
    dtype cast, no FP8) with the same dtype and size. The next stagings are then one
    ``torch._foreach_copy_`` of the same values into the same buffers. Valid while the staged
    buffers are the same (``allocations`` and bucket count) and every parameter still has its
    storage (``data_ptr``).
    """

    dsts: list[torch.Tensor]
    srcs: list[torch.Tensor]
    params: list[tuple[torch.Tensor, int]]
    allocations: int
    n_buckets: int
    nbytes: int

    @classmethod
    def build(cls, model: Any, dims: Any, staging: BucketStaging, nbytes: int) -> Optional["_ViewPlan"]:
        """The plan for ``model``'s current staging, or None where the staging is not plain views."""
        from megatron_vespo.checkpoint.hf_weights import hf_source_views

        views, dst = hf_source_views(model, dims), staging.named_views()
        if views is None or len(views) != len(dst) or {n for n, _, _ in views} != set(dst):
            return None
        if any(dst[n].dtype != v.dtype or dst[n].numel() != v.numel() for n, v, _ in views):
            return None
        params = list({id(p): (p, p.data_ptr()) for _, _, p in views}.values())
        return cls([dst[n].view(v.shape) for n, v, _ in views], [v for _, v, _ in views], params,
                   staging.allocations, len(staging.buckets()), nbytes)

    def valid(self, staging: BucketStaging) -> bool:
        """Same staged buffers, and no parameter got new storage since the plan was built."""
        return (staging.allocations == self.allocations and len(staging.buckets()) == self.n_buckets
                and all(p.data_ptr() == ptr for p, ptr in self.params))


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TensorWeightSync:
    """Push the actor's weights to colocated engines with ``update_weights_from_tensor``.

    Args:
        hf_cfg: the model's HF config (mapping dims).
        cfg: ``WeightSyncConfig`` (bucket size, export dtype).
        engine_tp_size: GPUs per engine (SGLang ``--tp-size``); the world must be a multiple.
        device: where bucket copies live (default: the current CUDA device, else CPU).
    """

    def __init__(self, hf_cfg: Any, cfg: Optional[WeightSyncConfig] = None, *, engine_tp_size: int = 1,
                 device: Optional[torch.device] = None) -> None:
        from megatron_vespo.checkpoint.hf_weights import as_dims

        self.dims, self.cfg, self.tp = as_dims(hf_cfg), cfg or WeightSyncConfig(), int(engine_tp_size)
        if self.tp < 1:
            raise ValueError(f"engine_tp_size must be >= 1, got {engine_tp_size}")
        self.device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                 else torch.device("cpu"))
        # CPU: buckets live in persistent shared memory (staging.py); GPU: one bucket at a time, freed after
        self.staging = BucketStaging() if self.device.type == "cpu" else None
        self._plan: Optional[_ViewPlan] = None  # one process: the staging as one copy (see _ViewPlan)

    def _post(self, clients: Sequence[Any], run: Callable[[Awaitable[Any]], Any], payloads: list[str],
              version: Optional[int], last: bool) -> Optional[str]:
        async def go() -> list[Any]:
            return await asyncio.gather(*[
                c.update_weights_from_tensor(payloads[e * self.tp:(e + 1) * self.tp],
                                             version if last else None, load_format="flattened_bucket",
                                             flush_cache=last)
                for e, c in enumerate(clients)], return_exceptions=True)
        errors = [f"{type(r).__name__}: {r}" for r in run(go()) if isinstance(r, BaseException)]
        return "; ".join(errors) or None

    @staticmethod
    def _windows(clients: Sequence[Any], run: Callable[[Awaitable[Any]], Any], what: str,
                 which: list[bool]) -> tuple[list[bool], Optional[str]]:
        """``begin``/``end_weight_update`` on the engines flagged in ``which``: (opened, error)."""
        async def go() -> list[Any]:
            calls = [c.begin_weight_update() if what == "begin" else c.end_weight_update()
                     for c, w in zip(clients, which) if w]
            return await asyncio.gather(*calls, return_exceptions=True)
        try:
            results = run(go())
        except Exception as exc:  # noqa: BLE001 - reported like an engine's error
            results = [exc] * sum(which)
        opened = [r is True for r in results] if what == "begin" else []
        errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        if errors and what == "begin" and any(opened):
            TensorWeightSync._windows([c for c, o in zip(clients, opened) if o], run, "end", [True] * sum(opened))
            opened = []
        return opened, (f"weight-update window ({what}) failed: " + "; ".join(errors)) if errors else None

    @torch.no_grad()
    def push(self, model: Any, version: int, clients: Optional[Sequence[Any]] = None,
             run: Optional[Callable[[Awaitable[Any]], Any]] = None) -> dict[str, float]:
        """Collective: every training rank serializes each bucket; rank 0 posts them to ``clients``.

        Raises RuntimeError on every rank when an engine rejects a bucket.
        """
        from megatron_vespo.checkpoint.hf_weights import iter_hf_weights

        rank, world = _rank_world()
        error = self._layout_error(rank, world, clients, run, "push")
        opened: list[bool] = []
        if rank == 0 and error is None:  # sglang >= 0.5.21 refuses the update outside a window
            opened, error = self._windows(clients, run, "begin", [True] * len(clients))
        if world > 1:  # rank 0 decides, every rank raises: the others would wait in the export's collectives
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise (RuntimeError if "window" in error else ValueError)(error)
        t0, nbytes, nbuckets = time.perf_counter(), 0, 0
        buckets = iter_hf_weights(model, self.dims, bucket_bytes=self.cfg.bucket_bytes, dtype=self.cfg.export_dtype)
        try:
            for bucket, last in with_last(buckets):  # the last bucket carries the version and the cache flush
                self._send(nbuckets, bucket, last, version, clients, run, rank, world)
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                nbuckets += 1
            if self.staging is not None:
                self.staging.trim(nbuckets)
        finally:
            if rank == 0 and any(opened):
                _, end_error = self._windows(clients, run, "end", opened)
                if end_error is not None:
                    logger.error("%s", end_error)
        return {"weight_sync/total_s": time.perf_counter() - t0, "weight_sync/bytes": float(nbytes),
                "weight_sync/buckets": float(nbuckets)}

    def _layout_error(self, rank: int, world: int, clients: Optional[Sequence[Any]], run: Any,
                      what: str) -> Optional[str]:
        """Rank 0's clients and the engines' layout against the training world; None when they fit."""
        if rank == 0 and (clients is None or run is None):
            return f"TensorWeightSync.{what} needs clients= and run= on rank 0"
        if world % self.tp or (rank == 0 and len(clients) != world // self.tp):
            return (f"colocated engines: {world} training ranks must equal engines x engine_tp_size "
                    f"({len(clients or [])} x {self.tp})")
        return None

    @torch.no_grad()
    def stage(self, model: Any, clients: Optional[Sequence[Any]] = None,
              run: Optional[Callable[[Awaitable[Any]], Any]] = None) -> StagedWeights:
        """Collective, CPU only: every bucket into this rank's persistent buffers -> rank 0 holds every payload.

        The engines' load is then :meth:`send` on rank 0 (no collectives, so it may run in a
        background thread). The buffers are rewritten by the next ``stage`` / ``push``: ``send``
        must have returned by then (``orchestration/weight_load.py`` joins it first). ``clients``
        and ``run`` (rank 0) are only checked here, against the training world.
        """
        from megatron_vespo.checkpoint.hf_weights import iter_hf_weights

        rank, world = _rank_world()
        error = self._layout_error(rank, world, clients, run, "stage")
        if error is None and self.staging is None:
            error = f"TensorWeightSync.stage keeps buckets in host shared memory; the device is {self.device}"
        if world > 1:  # rank 0's verdict on every rank: the others would wait in the gathers below
            box = [error]
            torch.distributed.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise ValueError(error)
        t0, nbytes, payloads = time.perf_counter(), 0, []
        plan = self._plan if world == 1 else None
        if plan is not None and plan.valid(self.staging):
            torch._foreach_copy_(plan.dsts, plan.srcs)  # one call: no Python per tensor, no GIL held while copying
            # pickled anew every time, not cached: each pickling of a file_system-shared storage increfs
            # it and each unpickling decrefs it (torch/multiprocessing/reductions.py, reduce_storage /
            # rebuild_storage_filename, torch 2.13), so a reused payload would unbalance the count
            buckets = self.staging.buckets()
            return StagedWeights([[serialize(b)] for b in buckets], plan.nbytes, time.perf_counter() - t0)
        buckets = iter_hf_weights(model, self.dims, bucket_bytes=self.cfg.bucket_bytes, dtype=self.cfg.export_dtype)
        for index, bucket in enumerate(buckets):
            payloads.append(self._payloads(index, bucket, rank, world)[0])
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        self.staging.trim(len(payloads))
        self._plan = _ViewPlan.build(model, self.dims, self.staging, nbytes) if world == 1 else None
        return StagedWeights(payloads if rank == 0 else None, nbytes, time.perf_counter() - t0)

    def send(self, staged: StagedWeights, version: int, clients: Sequence[Any], run: Callable[[Awaitable[Any]], Any],
             *, pause: Optional[Callable[[], Any]] = None, resume: Optional[Callable[[], Any]] = None
             ) -> dict[str, float]:
        """Rank 0: post the staged buckets (the last one carries ``version``) inside a weight-update window.

        Order, as slime / miles run a session (pause -> begin -> transfer -> end -> resume):
        ``pause`` (optional) before the window opens and ``resume`` after it closed. SGLang's
        ``begin_weight_update`` restores in-place-packed weights to a loadable layout and
        ``end_weight_update`` post-processes them (``ModelRunner.begin/end_weight_update``), so
        the engines must not generate while the window is open. Raises RuntimeError naming the
        engine's refusal; the window is closed and ``resume`` runs on every path.
        """
        if staged.payloads is None:
            raise ValueError("TensorWeightSync.send runs on training rank 0 (the one that holds the payloads)")
        t0 = time.perf_counter()
        if pause is not None:
            pause()
        try:
            opened, error = self._windows(clients, run, "begin", [True] * len(clients))
            if error is not None:
                raise RuntimeError(error)
            try:
                for i, payloads in enumerate(staged.payloads):
                    error = self._post(clients, run, payloads, version, i == len(staged.payloads) - 1)
                    if error is not None:
                        raise RuntimeError(f"update_weights_from_tensor failed: {error}")
            finally:
                if any(opened):
                    _, end_error = self._windows(clients, run, "end", opened)
                    if end_error is not None:
                        logger.error("%s", end_error)
        finally:
            if resume is not None:
                resume()
        elapsed = time.perf_counter() - t0
        return {"weight_sync/load_s": elapsed, "weight_sync/bytes": float(staged.nbytes),
                "weight_sync/buckets": float(len(staged.payloads)),
                "time/engines_paused_s": elapsed if pause is not None else 0.0}

    def _payloads(self, index: int, bucket: list, rank: int, world: int) -> tuple[Optional[list[str]], dict]:
        """Collective: this rank's flattened bucket ``index`` -> (every rank's payload on rank 0, else None; the data).

        The data must stay alive until the engines have answered for this bucket.
        """
        if self.staging is not None:
            data = self.staging.pack(index, bucket)
        else:
            data = flattened_bucket([(n, t.to(self.device)) for n, t in bucket])
        mine = serialize(data)
        payloads = [mine]
        if world > 1:
            payloads = [None] * world if rank == 0 else None
            torch.distributed.gather_object(mine, payloads, dst=0)
        return payloads, data

    def _send(self, index: int, bucket: list, last: bool, version: int, clients: Any, run: Any, rank: int,
              world: int) -> None:
        payloads, data = self._payloads(index, bucket, rank, world)
        status = [None]
        if rank == 0:
            try:
                status = [self._post(clients, run, payloads, version, last)]
            except Exception as exc:  # noqa: BLE001 - shared below so no rank is left in the broadcast
                status = [f"{type(exc).__name__}: {exc}"]
        if world > 1:  # also keeps every rank's bucket alive until the engines have copied it
            torch.distributed.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise RuntimeError(f"update_weights_from_tensor failed: {status[0]}")
        del data
