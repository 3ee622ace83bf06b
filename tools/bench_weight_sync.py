"""Benchmark the weight-sync paths on CPU: disk vs distributed (gloo broadcast) vs tensor (shared memory).

For each model size, one Megatron actor (1 process) and one embedded engine in its own process
(as in a real job: the engine is another process); every path pushes the same weights several
times, interleaved, and the median wall time of a whole sync (export + transfer + engine load)
is reported with its ratio to disk. After each path the engine's greedy log-probs are recorded
for the same prompt: equal numbers mean the engine holds the same weights whichever path put
them there.

  disk         DiskWeightSync: save_hf_checkpoint (safetensors) + /update_weights_from_disk
  distributed  DistributedWeightSync: /update_weights_from_distributed + gloo broadcast per tensor
  flat         the same with weight_sync.flattened_bucket (one broadcast per bucket)
  tensor       TensorWeightSync: /update_weights_from_tensor with shared-memory payloads

Usage: python tools/bench_weight_sync.py [--sizes tiny,medium] [--repeats 3] [--bucket-mb 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    "tiny": {},
    # ~33M parameters (130 MB fp32): 4 MoE layers of 16 experts, hidden 512, vocab 4096
    "medium": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 4, "head_dim": 64, "num_local_experts": 16, "moe_intermediate_size": 256,
               "vocab_size": 4096},
}
PATHS = ("disk", "distributed", "flat", "tensor")


def build(size: str):
    """Megatron model + HF config of ``size`` (1 process, gloo)."""
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config
    from megatron_vespo.train.config import ParallelConfig
    from megatron_vespo.train.parallel import init_parallel

    parallel = ParallelConfig()
    init_parallel(parallel)
    hf_cfg = get_hf_config(ModelConfig(preset="tiny", hf_overrides=SIZES[size]))
    return build_gpt_model(hf_cfg, parallel, params_dtype="float32"), hf_cfg


def bench_size(size: str, repeats: int, bucket_mb: float, threads: int) -> dict:
    """Time every path for one model size; returns medians, ratios and the log-prob check."""
    from megatron_vespo.checkpoint.mcore_io import save_hf_checkpoint
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.rollout.embedded.server import start_embedded_server
    from megatron_vespo.weight_sync import DiskWeightSync, WeightSyncConfig
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync
    from megatron_vespo.weight_sync.tensor import TensorWeightSync

    model, hf_cfg = build(size)
    nparams = sum(p.numel() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_ws_{size}_"))
    start = save_hf_checkpoint(model, hf_cfg, tmp / "start")
    handle = start_embedded_server(str(start), mode="process", env={"OMP_NUM_THREADS": str(threads)})
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    client = SGLangClient(handle.url, timeout_s=600, max_retries=0)
    cfg = WeightSyncConfig(bucket_mb=bucket_mb, init_timeout_s=120, op_timeout_s=600)
    syncs = {"distributed": DistributedWeightSync(hf_cfg, cfg),
             "flat": DistributedWeightSync(hf_cfg, cfg.model_copy(update={"flattened_bucket": True,
                                                                            "group_name": "flat_group"})),
             "tensor": TensorWeightSync(hf_cfg, cfg)}
    disk = DiskWeightSync(tmp / "weights", hf_cfg)
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    split: dict[str, list[tuple[float, float]]] = {"distributed": [], "flat": []}
    logprobs: dict[str, list[float]] = {}
    version = 0
    try:
        connect = {k: syncs[k].connect([client], run) for k in ("distributed", "flat")}
        for r in range(repeats + 1):  # round 0 warms up
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.99)  # new weights every round, the same for every path within it
            for path in PATHS:
                version += 1
                t0 = time.perf_counter()
                if path == "disk":
                    disk.push(model, version, load=client.update_weights_from_disk, run=run)
                else:
                    m = syncs[path].push(model, version, clients=[client], run=run)
                    if r and path != "tensor":
                        split[path].append((m["weight_sync/export_s"], m["weight_sync/send_s"]))
                if r:
                    times[path].append(time.perf_counter() - t0)
                if r == repeats:
                    sample = run(client.generate([5, 9, 2, 7], {"max_new_tokens": 8, "temperature": 0.0,
                                                                "ignore_eos": True}))
                    logprobs[path] = [float(x) for x in sample.rollout_log_probs]
        for k in ("distributed", "flat"):
            syncs[k].disconnect(run)
    finally:
        run(client.aclose())
        loop.close()
        handle.stop()
        from megatron_vespo.train.parallel import destroy_parallel

        destroy_parallel(destroy_process_group=True)
    med = {p: statistics.median(t) for p, t in times.items()}
    return {"size": size, "params": nparams, "mbytes": nparams * 4 / 2**20, "median_s": med,
            "speedup_vs_disk": {p: med["disk"] / med[p] for p in PATHS}, "connect_s": connect,
            "export_send_s": {k: [statistics.median(x) for x in zip(*v)] for k, v in split.items()},
            "same_logprobs": all(logprobs[p] == logprobs["disk"] for p in PATHS)}


def main() -> None:
    """Run the benchmark and print a table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,medium")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the engine")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = [bench_size(s, args.repeats, args.bucket_mb, args.threads) for s in args.sizes.split(",")]
    print(f"{'model':8} {'params':>10} {'MB':>7} " + " ".join(f"{p + ' s':>14}" for p in PATHS) + "  same bits")
    for r in results:
        cells = " ".join(f"{r['median_s'][p]:7.3f} ({r['speedup_vs_disk'][p]:4.1f}x)" for p in PATHS)
        print(f"{r['size']:8} {r['params']:>10,} {r['mbytes']:7.1f} {cells}  {r['same_logprobs']}")
    print("(median seconds per sync; (Nx) = disk time / path time; connect once: "
          + ", ".join(f"{r['size']} {r['connect_s']['distributed']:.2f}s" for r in results) + ")")
    for r in results:
        print(f"{r['size']}: export / send+load seconds: "
              + ", ".join(f"{k} {e:.3f} / {s:.3f}" for k, (e, s) in r["export_send_s"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
