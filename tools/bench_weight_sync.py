"""Benchmark the weight-sync paths on CPU: disk vs distributed (gloo broadcast) vs tensor (shared memory).

For each model size, one Megatron actor (1 process) and one embedded engine in its own process
(as in a real job: the engine is another process); every path pushes the same weights several
times, interleaved, and the median wall time of a whole sync (export + transfer + engine load)
is reported with its ratio to disk. After each path the engine's greedy log-probs are recorded
for the same prompt: equal numbers mean the engine holds the same weights whichever path put
them there.

  disk         DiskWeightSync: save_hf_checkpoint (safetensors) + /update_weights_from_disk
  distributed  DistributedWeightSync with flattened_bucket=false: one gloo broadcast per tensor
  flat         DistributedWeightSync as configured by default: one flat broadcast per bucket
  tensor       TensorWeightSync: /update_weights_from_tensor with shared-memory payloads
  recv         flat into a receive-only stand-in engine process (tools/ws_stand_in_engine.py --join init):
               the trainer's side of a sync (export, pack, HTTP per bucket, broadcast) without an
               engine's model load -- on GPU, SGLang's load is a device copy

Size ``30b`` is Qwen3-30B-A3B's layout (48 layers x 128 experts, top-8, GQA 8:1, 18,867 HF
tensors, as many buckets per GB) with every width divided by 32 (hidden 64, expert FFN 24, vocab
4096): what a sync at 30B costs in per-tensor, per-bucket and per-request overheads. For the
distributed paths the bench also reports bytes/s against the link: a raw gloo broadcast of the
same number of bytes, as one tensor, between this process and a second process on the same
loopback (``link``), so ratio 1.0 = the sync moves weights as fast as the wire allows.
``export only`` iterates the export alone (no send): with export and send overlapped a sync
takes about max(export, transfer), not their sum.

Usage: python tools/bench_weight_sync.py [--sizes tiny,medium,30b] [--repeats 3] [--bucket-mb 64]
       [--dtype bfloat16] [--paths disk,distributed,flat,tensor] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SIZES = {
    "tiny": ("tiny", {}),
    # ~33M parameters (130 MB fp32): 4 MoE layers of 16 experts, hidden 512, vocab 4096
    "medium": ("tiny", {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_local_experts": 16,
                        "moe_intermediate_size": 256, "vocab_size": 4096}),
    # Qwen3-30B-A3B's tensor count and layout, widths / 32 (see the module docstring)
    "30b": ("qwen3-30b-a3b", {"hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 8,
                              "num_key_value_heads": 1, "head_dim": 8, "moe_intermediate_size": 24,
                              "vocab_size": 4096, "max_position_embeddings": 512}),
}
PATHS = ("disk", "distributed", "flat", "tensor", "recv")


def build(size: str):
    """Megatron model + HF config of ``size`` (1 process, gloo)."""
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config
    from megatron_vespo.train.config import ParallelConfig
    from megatron_vespo.train.parallel import init_parallel

    parallel = ParallelConfig()
    init_parallel(parallel)
    preset, overrides = SIZES[size]
    hf_cfg = get_hf_config(ModelConfig(preset=preset, hf_overrides=overrides))
    return build_gpt_model(hf_cfg, parallel, params_dtype="float32"), hf_cfg


def _link_receiver(port: int, nbytes: int, reps: int) -> None:
    """Second process of the link measurement: receive ``reps`` broadcasts of ``nbytes``."""
    from datetime import timedelta

    store = torch.distributed.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=120))
    pg = torch.distributed.ProcessGroupGloo(store, 1, 2, timedelta(seconds=120))
    buf = torch.empty(nbytes, dtype=torch.uint8)
    for _ in range(reps + 1):
        pg.broadcast([buf]).wait()


def link_bytes_per_s(nbytes: int, reps: int = 3) -> float:
    """Median bytes/s of a raw gloo broadcast of ``nbytes`` (one tensor) to another local process."""
    import multiprocessing as mp
    from datetime import timedelta

    store = torch.distributed.TCPStore("127.0.0.1", 0, 2, True, timedelta(seconds=120), wait_for_workers=False)
    proc = mp.get_context("spawn").Process(target=_link_receiver, args=(store.port, nbytes, reps))
    proc.start()
    pg = torch.distributed.ProcessGroupGloo(store, 0, 2, timedelta(seconds=120))
    buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    times = []
    for r in range(reps + 1):  # the first one warms up
        t0 = time.perf_counter()
        pg.broadcast([buf]).wait()
        if r:
            times.append(time.perf_counter() - t0)
    proc.join(timeout=60)
    return nbytes / statistics.median(times)


def start_stand_in() -> tuple[Any, Any]:
    """(process, client) of a receive-only stand-in engine (``tools/ws_stand_in_engine.py --join init``)."""
    import os
    import subprocess
    import sys

    import httpx

    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.utils.net import free_port

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(root / "tools" / "ws_stand_in_engine.py"), "--port", str(port),
                             "--version", "0.5.23", "--join", "init"], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200:
                return proc, SGLangClient(url, timeout_s=600, max_retries=0)
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the stand-in engine did not start")


def export_only(model, hf_cfg, cfg) -> tuple[float, int]:
    """(seconds, HF tensors) of iterating the export alone, packing each bucket as the flat path does."""
    from megatron_vespo.checkpoint.hf_weights import iter_hf_weights
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync

    sync, n = DistributedWeightSync(hf_cfg, cfg), 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for bucket in iter_hf_weights(model, sync.dims, bucket_bytes=cfg.bucket_bytes, dtype=cfg.dtype, dst=0):
            sync.pack(bucket)
            n += len(bucket)
    return time.perf_counter() - t0, n


def ep_gathers_per_sync(size: str, ep: int) -> tuple[int, int]:
    """(EP all-gathers per sync now, with one per local expert as before) for ``size`` at EP ``ep``."""
    from megatron_vespo.checkpoint.hf_weights import ShardLayout, _plan, as_dims
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import get_hf_config

    preset, overrides = SIZES[size]
    dims = as_dims(get_hf_config(ModelConfig(preset=preset, hf_overrides=overrides)))
    now = sum(1 for u in _plan(dims, ShardLayout(ep_size=ep)) if u[0].expert is not None)
    return now, len(dims.moe_layers) * (dims.num_experts // ep) * 2


def bench_size(size: str, repeats: int, bucket_mb: float, threads: int, dtype: str | None = None,
               paths: tuple = PATHS) -> dict:
    """Time every path for one model size; returns medians, ratios, bytes/s vs the link and the log-prob check."""
    from megatron_vespo.checkpoint.hf_dir import save_hf_checkpoint
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.rollout.embedded.server import start_embedded_server
    from megatron_vespo.weight_sync import DiskWeightSync, WeightSyncConfig
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync
    from megatron_vespo.weight_sync.tensor import TensorWeightSync

    model, hf_cfg = build(size)
    nparams = sum(p.numel() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_ws_{size}_"))
    start = save_hf_checkpoint(model, hf_cfg, tmp / "start", dtype=dtype)
    handle = start_embedded_server(str(start), mode="process", env={"OMP_NUM_THREADS": str(threads)})
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    client = SGLangClient(handle.url, timeout_s=600, max_retries=0)
    cfg = WeightSyncConfig(bucket_mb=bucket_mb, init_timeout_s=120, op_timeout_s=600, dtype=dtype)
    syncs = {"distributed": DistributedWeightSync(hf_cfg, cfg.model_copy(update={"flattened_bucket": False})),
             "flat": DistributedWeightSync(hf_cfg, cfg.model_copy(update={"group_name": "flat_group"})),
             "tensor": TensorWeightSync(hf_cfg, cfg),
             "recv": DistributedWeightSync(hf_cfg, cfg.model_copy(update={"group_name": "recv_group"}))}
    stand_in, recv_client = start_stand_in() if "recv" in paths else (None, None)
    disk = DiskWeightSync(tmp / "weights", hf_cfg, dtype=dtype)
    times: dict[str, list[float]] = {p: [] for p in paths}
    split: dict[str, list[tuple[float, float]]] = {p: [] for p in ("distributed", "flat", "recv") if p in paths}
    target = {p: (recv_client if p == "recv" else client) for p in paths}
    logprobs: dict[str, list[float]] = {}
    version, nbytes, nbuckets = 0, 0, 0
    try:
        connect = {k: syncs[k].connect([target[k]], run) for k in split}
        for r in range(repeats + 1):  # round 0 warms up
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.99)  # new weights every round, the same for every path within it
            for path in paths:
                version += 1
                t0 = time.perf_counter()
                if path == "disk":
                    disk.push(model, version, load=client.update_weights_from_disk, run=run)
                else:
                    m = syncs[path].push(model, version, clients=[target[path]], run=run)
                    nbytes, nbuckets = int(m["weight_sync/bytes"]), int(m["weight_sync/buckets"])
                    if r and path in split:
                        split[path].append((m["weight_sync/export_s"], m["weight_sync/send_s"]))
                if r:
                    times[path].append(time.perf_counter() - t0)
                if r == repeats and path != "recv":
                    sample = run(client.generate([5, 9, 2, 7], {"max_new_tokens": 8, "temperature": 0.0,
                                                                "ignore_eos": True}))
                    logprobs[path] = [float(x) for x in sample.rollout_log_probs]
        for k in split:
            syncs[k].disconnect(run)
        alone = [export_only(model, hf_cfg, cfg) for _ in range(max(1, repeats))]
        export_s, ntensors = statistics.median(a[0] for a in alone), alone[0][1]
    finally:
        run(client.aclose())
        if stand_in is not None:
            run(recv_client.aclose())
            stand_in.kill()
        loop.close()
        handle.stop()
        from megatron_vespo.train.parallel import destroy_parallel

        destroy_parallel(destroy_process_group=True)
    link = link_bytes_per_s(nbytes) if split else None
    med = {p: statistics.median(t) for p, t in times.items()}
    ref = paths[0]
    return {"size": size, "params": nparams, "dtype": dtype or "float32", "sync_mbytes": nbytes / 2**20,
            "buckets": nbuckets, "hf_tensors": ntensors, "median_s": med,
            "ratio_vs": ref, "speedup": {p: med[ref] / med[p] for p in paths}, "connect_s": connect,
            "export_send_s": {k: [statistics.median(x) for x in zip(*v)] for k, v in split.items()},
            "export_only_s": export_s, "link_bytes_per_s": link,
            "bytes_per_s": {k: nbytes / med[k] for k in split},
            "link_ratio": {k: nbytes / med[k] / link for k in split} if link else {},
            "ep8_all_gathers": ep_gathers_per_sync(size, 8) if SIZES[size][1].get("num_experts", 128) % 8 == 0
            else None,
            "same_logprobs": all(logprobs[p] == logprobs[ref] for p in logprobs)}


def main() -> None:
    """Run the benchmark and print a table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}; ratios are to the first")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="export dtype")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the engine")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    paths = tuple(p for p in args.paths.split(",") if p)
    if not paths or set(paths) - set(PATHS):
        ap.error(f"--paths: choose from {','.join(PATHS)}, got {args.paths!r}")
    torch.set_num_threads(args.threads)
    results = [bench_size(s, args.repeats, args.bucket_mb, args.threads, args.dtype, paths)
               for s in args.sizes.split(",")]
    print(f"{'model':8} {'params':>11} {'sync MB':>8} {'buckets':>7} " + " ".join(f"{p + ' s':>15}" for p in paths)
          + "  same bits")
    for r in results:
        cells = " ".join(f"{r['median_s'][p]:8.3f} ({r['speedup'][p]:4.1f}x)" for p in paths)
        print(f"{r['size']:8} {r['params']:>11,} {r['sync_mbytes']:8.1f} {r['buckets']:>7} {cells}  "
              f"{r['same_logprobs']}")
    print(f"(median seconds per sync; (Nx) = {paths[0]} time / path time)")
    for r in results:
        if r["link_bytes_per_s"]:
            print(f"{r['size']}: link (raw gloo broadcast of {r['sync_mbytes']:.1f} MB) "
                  f"{r['link_bytes_per_s'] / 2**20:.0f} MB/s; "
                  + ", ".join(f"{k} {v / 2**20:.0f} MB/s = {r['link_ratio'][k]:.2f} of the link"
                              for k, v in r["bytes_per_s"].items()))
        print(f"{r['size']}: {r['hf_tensors']:,} HF tensors ({r['dtype']}); export alone "
              f"{r['export_only_s']:.3f} s; in a sync, export / waiting for transfer: "
              + ", ".join(f"{k} {e:.3f} / {s:.3f}" for k, (e, s) in r["export_send_s"].items())
              + (f"; EP8 all-gathers per sync: {r['ep8_all_gathers'][0]} (one per local expert: "
                 f"{r['ep8_all_gathers'][1]})" if r["ep8_all_gathers"] else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
