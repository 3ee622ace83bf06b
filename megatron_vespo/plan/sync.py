"""The weight-sync plan: buckets, bytes, collectives and HTTP calls per sync, and its time at a bandwidth.

The buckets are the ones ``checkpoint.hf_weights.iter_hf_weights`` produced on the meta shards with
the job's ``weight_sync.bucket_mb`` and ``weight_sync.dtype`` (``plan.shards``), so their count
and sizes are the real ones. Per path (``weight_sync.kind``, see docs/weight_sync.md):

* ``distributed`` (``weight_sync/distributed.py``): per bucket one POST
  ``/update_weights_from_distributed`` per engine and one broadcast per tensor over the
  weight-update group (one per bucket with ``weight_sync.flattened_bucket``); the group is
  created once (one ``/init_weights_update_group`` per engine).
* ``tensor`` (colocated, ``weight_sync/tensor.py``): per bucket one POST
  ``/update_weights_from_tensor`` per engine, carrying CUDA-IPC handles (no bytes on the link).
* ``disk`` (``weight_sync/disk.py``): the HF checkpoint written once, one POST
  ``/update_weights_from_disk`` per engine, each engine reads every byte.

Time = bytes / link bandwidth + one HTTP round trip (``http_latency_s``) per call; the trainer-side
export (TP/EP all-gathers counted on the shards) is not timed here.
"""

from __future__ import annotations

from typing import Any

HTTP_LATENCY_S = 0.005


def sync_plan(job: Any, build: Any, link_gbps: float, http_latency_s: float = HTTP_LATENCY_S) -> dict[str, Any]:
    """Plan of one weight sync for ``job`` from a :class:`megatron_vespo.plan.shards.BuildResult`."""
    path = job.weight_sync.kind
    engines = len(job.rollout.urls) or job.rollout.num_engines
    buckets = build.export_buckets
    n_buckets = len(buckets)
    total = sum(b for _, b in buckets)
    tensors = sum(n for n, _ in buckets)
    largest = max((b for _, b in buckets), default=0)
    out: dict[str, Any] = {
        "path": path, "engines": engines, "engine_tp": job.rollout.tp_size, "bucket_mb": job.weight_sync.bucket_mb,
        "dtype": job.weight_sync.dtype or job.model.params_dtype, "buckets": n_buckets, "tensors": tensors,
        "bytes": total, "largest_bucket_bytes": largest,
        "export_collectives": dict(build.export_collectives),
    }
    if path == "distributed":
        per_bucket = 1 if job.weight_sync.flattened_bucket else None
        out["broadcasts"] = n_buckets if per_bucket else tensors
        out["http_calls"] = n_buckets * engines
        out["http_calls_first_sync"] = out["http_calls"] + engines  # /init_weights_update_group
        link_bytes = total
    elif path == "tensor":
        out["broadcasts"] = 0
        out["http_calls"] = n_buckets * engines
        link_bytes = 0  # CUDA IPC handles: the engines map the trainer's buffers
    else:  # disk
        out["broadcasts"] = 0
        out["http_calls"] = engines
        link_bytes = total * engines  # each engine reads the checkpoint
    out["link_bytes"] = link_bytes
    out["link_gbps"] = link_gbps
    out["seconds"] = link_bytes * 8 / (link_gbps * 1e9) + out["http_calls"] * http_latency_s
    return out
