"""In-memory weight updates of the embedded engine: SGLang's NCCL-group and tensor endpoints on CPU.

* :class:`WeightUpdateGroups` joins the trainer's weight-update group the way SGLang's
  ``ModelRunner.init_weights_update_group`` does (``tcp://`` rendezvous, ``PrefixStore(group_name)``,
  torch's ``_new_process_group_helper``, group rank = ``rank_offset + tp_rank`` with tp_rank 0),
  gloo only, and receives the broadcasts of ``update_weights_from_distributed``: one per tensor,
  or one flat uint8 tensor with ``load_format="flattened_bucket"``.
* :func:`hf_param_views` maps checkpoint (HF) tensor names onto the served model: transformers
  5 keeps MoE experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``
  [E, H, I]), so per-expert checkpoint names are views into those.
* :func:`load_named_tensors` validates a whole bucket (names, shapes, floating dtypes) before
  copying any of it -- stricter than SGLang, which may leave a bucket half-loaded.
* :func:`deserialize_named_tensors` reads ``update_weights_from_tensor`` payloads (SGLang's
  ``MultiprocessingSerializer`` strings) with an allowlist unpickler; on CPU the tensors arrive
  as shared memory from a process on this machine.
"""

from __future__ import annotations

import base64
import io
import logging
import pickle
import re
import threading
import weakref
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch

from megatron_vespo.rollout.embedded.weight_checks import check_finite
from megatron_vespo.wire import parse_dtype, reconstruct_flattened

logger = logging.getLogger(__name__)

_FUSED = re.compile(r"(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)")


_VIEWS_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def hf_param_views(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{checkpoint name: tensor view into the model}`` (fused parameter names included).

    Cached per model while its parameters keep their storage (a weight sync asks once per bucket:
    ~19k views for Qwen3-30B-A3B's layout, 114 times per sync).
    """
    state = model.state_dict(keep_vars=True)
    key = tuple((name, t.data_ptr(), tuple(t.shape), t.dtype) for name, t in state.items())
    hit = _VIEWS_CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    views = _build_views(state)
    _VIEWS_CACHE[model] = (key, views)
    return views


def _build_views(state: dict) -> dict[str, torch.Tensor]:
    views: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        data = t.data
        views[name] = data
        m = _FUSED.fullmatch(name)
        if m is None or data.dim() != 3:
            continue
        pre = m["prefix"]
        for e in range(data.shape[0]):
            if m["kind"] == "gate_up_proj":
                half = data.shape[1] // 2
                views[f"{pre}.{e}.gate_proj.weight"] = data[e, :half]
                views[f"{pre}.{e}.up_proj.weight"] = data[e, half:]
            else:
                views[f"{pre}.{e}.down_proj.weight"] = data[e]
    return views


@torch.no_grad()
def load_named_tensors(model: torch.nn.Module, named: Sequence[tuple[str, torch.Tensor]],
                       views: Optional[dict[str, torch.Tensor]] = None, checked: bool = False) -> int:
    """Copy ``(checkpoint name, tensor)`` pairs into ``model``; all-or-nothing.

    Raises ValueError naming the offending tensors (unknown name, shape mismatch, non-floating
    dtype, duplicate, NaN / inf values). dtypes are converted like SGLang's weight loaders do (bf16 -> fp32 ...).
    ``checked``: the caller already ran ``weight_checks.validate_full_checkpoint`` on these
    tensors, so the NaN / inf screen (a pass over every value) is not repeated.
    """
    from megatron_vespo.fp8.serving import check_fp8_update, served_fp8_block

    # FP8 weights + weight_scale_inv only into an engine serving block FP8, dequantised (fp8/serving.py)
    named = check_fp8_update(served_fp8_block(model), named, dtype=next(model.parameters()).dtype)
    views = hf_param_views(model) if views is None else views
    unknown = [n for n, _ in named if n not in views]
    if unknown:
        raise ValueError(f"{len(unknown)} tensor name(s) not in the served model, e.g. {unknown[:3]}")
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate tensor names in one update: {dups[:3]}")
    bad = [f"{n}: got {list(t.shape)}, served {list(views[n].shape)}" for n, t in named
           if tuple(t.shape) != tuple(views[n].shape)]
    if bad:
        raise ValueError(f"shape mismatch for {len(bad)} tensor(s): {'; '.join(bad[:3])}")
    bad = [f"{n}: {t.dtype}" for n, t in named if not t.dtype.is_floating_point]
    if bad:
        raise ValueError(f"weights must be floating point: {'; '.join(bad[:3])}")
    if not checked:
        check_finite(named)  # a NaN weight would make every later /generate fail
    for n, t in named:
        views[n].copy_(t)
    return len(named)


def _check_meta(names: Any, dtypes: Any, shapes: Any) -> list[tuple[str, torch.dtype, list[int]]]:
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise ValueError("names, dtypes and shapes must be lists")
    if not (len(names) == len(dtypes) == len(shapes)) or not names:
        raise ValueError(f"names, dtypes and shapes must be non-empty and of equal length "
                         f"(got {len(names)}, {len(dtypes)}, {len(shapes)})")
    out = []
    for n, d, s in zip(names, dtypes, shapes):
        if not isinstance(s, list) or any(not isinstance(x, int) or x < 0 for x in s):
            raise ValueError(f"shape of {n!r} must be a list of non-negative ints, got {s!r}")
        out.append((str(n), parse_dtype(d), s))
    return out


class WeightUpdateGroups:
    """The weight-update groups this engine has joined, by name (SGLang's ``_model_update_group``)."""

    def __init__(self, tp_rank: int = 0, timeout_s: float = 300.0) -> None:
        self.tp_rank, self.timeout_s = tp_rank, timeout_s
        self._groups: dict[str, Any] = {}
        self._lock = threading.Lock()  # one receive at a time: broadcasts must be consumed in order

    def init(self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str,
             backend: str = "nccl") -> tuple[bool, str]:
        """Join the group (blocks until every rank joined or ``timeout_s``); ``(success, message)``."""
        if backend != "gloo":
            return False, (f"backend {backend!r} is not supported by the embedded CPU engine (no CUDA): "
                           "use backend='gloo' (weight_sync.backend=gloo)")
        if not group_name:
            return False, "group_name cannot be empty"
        if group_name in self._groups:
            return False, f"group {group_name!r} already exists; destroy_weights_update_group first"
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world
        from torch.distributed.rendezvous import rendezvous

        rank = int(rank_offset) + self.tp_rank
        timeout = timedelta(seconds=self.timeout_s)
        try:
            store, _, _ = next(rendezvous(f"tcp://{master_address}:{int(master_port)}", rank, int(world_size),
                                          timeout=timeout))
            store.set_timeout(timeout)
            pg, _ = _new_process_group_helper(int(world_size), rank, [], Backend("gloo"),
                                              PrefixStore(group_name, store), group_name=group_name, timeout=timeout)
            _world.pg_group_ranks[pg] = {i: i for i in range(int(world_size))}
        except Exception as exc:  # noqa: BLE001 - reported to the caller like SGLang does
            logger.error("joining weight-update group %s failed: %s", group_name, exc)
            return False, f"Failed to initialize custom process group: {exc}."
        self._groups[group_name] = pg
        logger.info("joined weight-update group %s as rank %d/%d (%s:%s)", group_name, rank, world_size,
                    master_address, master_port)
        return True, "Succeeded to initialize custom process group."

    def destroy(self, group_name: str) -> tuple[bool, str]:
        """Leave ``group_name``; ``(success, message)`` as SGLang answers."""
        pg = self._groups.pop(group_name, None)
        if pg is None:
            return False, "The group to be destroyed does not exist."
        try:
            torch.distributed.destroy_process_group(pg)
        except Exception as exc:  # noqa: BLE001
            return False, f"Failed to destroy custom process group: {exc}."
        return True, "Succeeded to destroy custom process group."

    def destroy_all(self) -> None:
        """Leave every group (server shutdown)."""
        for name in list(self._groups):
            self.destroy(name)

    def receive(self, group_name: str, names: Any, dtypes: Any, shapes: Any,
                load_format: Optional[str] = None) -> list[tuple[str, torch.Tensor]]:
        """Receive one bucket broadcast from group rank 0; ValueError (before receiving) on bad metadata."""
        if group_name not in self._groups:
            raise ValueError(f"Group {group_name} not in {sorted(self._groups)}. Please call "
                             "`init_weights_update_group` first.")
        if load_format not in (None, "flattened_bucket"):
            raise ValueError(f"load_format {load_format!r} not supported (None, 'flattened_bucket')")
        meta = _check_meta(names, dtypes, shapes)
        pg = self._groups[group_name]
        with self._lock:
            if load_format == "flattened_bucket":
                sizes = [torch.Size(s).numel() * d.itemsize for _, d, s in meta]
                flat = torch.empty(sum(sizes), dtype=torch.uint8)
                torch.distributed.broadcast(flat, group_src=0, group=pg)
                return reconstruct_flattened(flat, meta)
            out = [(n, torch.empty(s, dtype=d)) for n, d, s in meta]
            # gloo has no float8 type: receive FP8 weights (weight_sync.dtype=fp8) as their bytes
            works = [torch.distributed.broadcast(t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn,
                                                 torch.float8_e5m2) else t, group_src=0, group=pg, async_op=True)
                     for _, t in out]
            for w in works:
                w.wait()
            return out


_ALLOWED = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float", "bool",
                              "slice", "range", "bytearray")
} | {
    ("collections", "OrderedDict"), ("copyreg", "__newobj__"), ("copyreg", "_reconstructor"),
    ("types", "SimpleNamespace"), ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"), ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
    ("torch", "UntypedStorage"), ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("multiprocessing.resource_sharer", "DupFd"), ("multiprocessing.reduction", "_rebuild_partial"),
    ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"),
} | {("torch.multiprocessing.reductions", n) for n in (
    "rebuild_tensor", "rebuild_cuda_tensor", "rebuild_storage_fd", "rebuild_storage_filename",
    "rebuild_storage_empty", "rebuild_typed_storage", "rebuild_typed_storage_child")}


class _AllowlistUnpickler(pickle.Unpickler):
    """Only tensors, storages and plain containers, like SGLang's ``SafeUnpickler``."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"blocked global {module}.{name} in a weight payload")


def deserialize_named_tensors(payload: str | bytes, load_format: Optional[str]) -> list[tuple[str, torch.Tensor]]:
    """One ``serialized_named_tensors`` entry -> ``[(name, tensor)]`` (plain list or flattened bucket)."""
    raw = base64.b64decode(payload, validate=True) if isinstance(payload, str) else bytes(payload)
    obj = _AllowlistUnpickler(io.BytesIO(raw)).load()
    if load_format == "flattened_bucket":
        if not isinstance(obj, dict) or not {"flattened_tensor", "metadata"} <= set(obj):
            raise ValueError("flattened_bucket payload must be a dict with flattened_tensor and metadata")
        meta = [(m.name, m.dtype, list(m.shape), m.start_idx, m.end_idx) for m in obj["metadata"]]
        return reconstruct_flattened(obj["flattened_tensor"], meta)
    if load_format is not None:
        raise ValueError(f"load_format {load_format!r} not supported (None, 'flattened_bucket')")
    if not isinstance(obj, list) or any(not (isinstance(x, (tuple, list)) and len(x) == 2) for x in obj):
        raise ValueError("payload must be a list of (name, tensor) pairs")
    return [(str(n), t) for n, t in obj]


class WeightUpdateWindow:
    """The weight-update window of sglang 0.5.21-0.5.23 (``SchedulerWeightUpdaterManager._session`` in
    ``managers/scheduler_components/weight_updater.py``): ``/begin_weight_update`` opens it,
    ``/end_weight_update`` closes it, and ``update_weights_from_distributed`` / ``_from_tensor``
    are refused (before anything is received) while it is closed. ``update_weights_from_disk``
    needs no window. Methods answer ``(success, message)`` with SGLang's messages.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.selector: Optional[str] = None
        self.opened = 0  # windows opened so far (tests read it)

    def begin(self, selector: Any = "all", generating: bool = False) -> tuple[bool, str]:
        """Open the window (``selector`` target | draft | all, as SGLang validates it).

        ``generating``: the engine is running a batch and generation is not paused. SGLang does
        not check this, but its ``ModelRunner.begin_weight_update`` restores in-place-packed
        weights to a loading layout that only ``end_weight_update`` finalises, so a batch
        decoded inside the window runs on unfinished weights (slime and miles pause first). This
        stand-in refuses, so a caller with the wrong order fails here.
        """
        if selector not in ("target", "draft", "all"):
            return False, f"invalid selector {selector!r}; expected 'target', 'draft', or 'all'"
        if generating:
            return False, ("generation is running: call pause_generation() before begin_weight_update() (the "
                           "weights are not servable between begin and end)")
        with self._lock:
            if self.selector is not None:
                return False, "a weight-update session is already open; call end_weight_update() first"
            self.selector, self.opened = str(selector), self.opened + 1
        return True, "Success"

    def end(self) -> tuple[bool, str]:
        """Close the window."""
        with self._lock:
            if self.selector is None:
                return False, "no weight-update session is open; call begin_weight_update() first"
            self.selector = None
        return True, "Success"

    @property
    def is_open(self) -> bool:
        """True between begin and end."""
        return self.selector is not None

    def refusal(self, endpoint: str) -> Optional[str]:
        """SGLang's refusal message for ``endpoint`` when the window is closed, else None."""
        if self.is_open:
            return None
        return f"{endpoint} must run between begin_weight_update() and end_weight_update()"
