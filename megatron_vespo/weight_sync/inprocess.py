"""Weight sync to an embedded engine that lives in the trainer's own process (same machine, one rank).

With one training rank and the embedded engine running as a thread of this process
(``rollout.engine=embedded``, one engine: the sync loop's default), ``loop.weight_sync=tensor``
hands the exported HF tensors to the engine directly: each bucket is copied into the served
parameters in place (``EmbeddedEngine.load_weights``: the same name / shape / dtype checks,
all-or-nothing per bucket, run between decode steps), with no shared-memory serialization and
no HTTP round trip. This is what SGLang's offline ``Engine.update_weights_from_tensor`` is to
its HTTP endpoint. Anything else (several ranks, engines in other processes, SGLang) takes
the ``/update_weights_from_tensor`` path of ``tensor.py``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from megatron_vespo.weight_sync.group import with_last

if TYPE_CHECKING:
    from megatron_vespo.rollout.interfaces import Engines


def in_process_engines(engines: Optional[Engines]) -> Optional[list[Any]]:
    """The embedded engine objects behind ``engines`` when every one runs in this process, else None.

    Also None with more than one training rank: the export is collective and every rank must
    take the same path (rank 0 alone knows the engines).
    """
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return None
    if engines is None or getattr(engines, "router", None) is None:
        return None
    local = [getattr(h, "engine", None) for h in getattr(engines, "_handles", [])]
    if not local or any(e is None for e in local) or len(local) != len(engines.router.clients):
        return None
    return local


@torch.no_grad()
def push_in_process(model: Any, version: int, local: Sequence[Any], clients: Sequence[Any], dims: Any,
                    cfg: Any) -> dict[str, float]:
    """Copy ``model``'s weights (HF names, ``cfg.dtype``, ``cfg.bucket_bytes`` buckets) into ``local`` engines.

    The last bucket tags ``version``; the clients learn it as after an HTTP update. Raises
    RuntimeError naming the engine's message when a bucket is refused.
    """
    from megatron_vespo.checkpoint.hf_weights import iter_hf_weights

    t0, nbytes, nbuckets = time.perf_counter(), 0, 0
    buckets = iter_hf_weights(model, dims, bucket_bytes=cfg.bucket_bytes, dtype=cfg.dtype)
    for bucket, last in with_last(buckets):
        for engine in local:
            ok, msg = engine.load_weights(bucket, str(int(version)) if last else None)
            if not ok:
                raise RuntimeError(f"in-process weight update of the embedded engine failed: {msg}")
        nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        nbuckets += 1
    for client in clients:
        client.policy_version = int(version)
    return {"weight_sync/total_s": time.perf_counter() - t0, "weight_sync/bytes": float(nbytes),
            "weight_sync/buckets": float(nbuckets), "weight_sync/in_process": 1.0}
