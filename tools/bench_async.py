"""Sync vs fully async loop: wall time for the same number of rollouts on the tiny CPU task.

Runs ``megatron-vespo train`` with ``loop.mode=sync`` and ``loop.mode=async`` (interleaved,
``--repeats`` times each) and prints, per mode, the median of: total wall time of the command,
loop time (sum of ``time/iteration_s``: rollout/wait + train + weight sync, without start-up),
and for async the time the trainer waited for data, the training time, the mean overlap
(fraction of the training time the engines were generating) and the mean policy lag; then the
sync/async ratios. Start-up differs by design (async starts Ray and the engine as a separate
process), so the loop ratio is the one that measures overlap.

    python tools/bench_async.py --rollouts 20 --repeats 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny_cpu_vespo.yaml"


def run_one(mode: str, rollouts: int, out: Path, threads: int, extra: list[str]) -> dict:
    """One training command; returns wall time and figures summed from its per-rollout metrics."""
    sets = [f"loop.mode={mode}", f"loop.num_rollouts={rollouts}", f"loop.output_dir={out}", *extra]
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "--log-level", "WARNING", "train", str(TINY)]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per = [r for r in rows if "rollout" in r]

    def total(key: str) -> float:
        return sum(float(r.get(key, 0.0)) for r in per)

    res = {"wall_s": wall, "loop_s": total("time/iteration_s"), "train_s": total("time/train_s"),
           "final_reward": sum(r["rollout/reward_mean"] for r in per[-3:]) / min(3, len(per))}
    if mode == "sync":
        res["rollout_s"] = total("time/rollout_s")
    else:
        res.update(wait_s=total("time/wait_s"), paused_s=total("time/engines_paused_s"),
                   # each row reports the rollout before it: the first has none (NaN)
                   overlap=statistics.mean(r["async/overlap_frac"] for r in per[1:]) if len(per) > 1 else float("nan"),
                   lag_mean=total("async/lag_mean") / len(per),
                   stale_dropped=total("async/stale_dropped_samples"))
    return res


def main() -> None:
    """Parse arguments, run both modes interleaved, print medians and ratios, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    ap.add_argument("--out", default=None, help="directory for the runs and results.json (default: a temp dir)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra job override (both modes)")
    ap.add_argument("--async-set", dest="async_extra", action="append", default=[],
                    help="extra override for the async runs, e.g. loop.max_policy_lag=2")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_async_"))
    runs: dict[str, list[dict]] = {"sync": [], "async": []}
    for i in range(args.repeats):
        for mode in ("sync", "async"):  # interleaved: machine load drifts over minutes
            extra = args.extra + (args.async_extra if mode == "async" else [])
            res = run_one(mode, args.rollouts, out / f"{mode}_{i}", args.threads, extra)
            res["load_avg_1m"] = os.getloadavg()[0]  # other work on the machine skews every figure
            runs[mode].append(res)
            print(f"[{i}] {mode:5s}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    load = os.getloadavg()[0]
    print(f"\n{args.rollouts} rollouts, {args.repeats} repeat(s), OMP_NUM_THREADS={args.threads}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the end (medians)")
    for m in ("sync", "async"):
        print(f"  {m:5s}: " + ", ".join(f"{k} {v:.2f}" for k, v in med[m].items()))
    ratios = {"wall": med["sync"]["wall_s"] / med["async"]["wall_s"],
              "loop": med["sync"]["loop_s"] / med["async"]["loop_s"]}
    print(f"  sync/async wall-time ratio {ratios['wall']:.2f}, loop-time ratio {ratios['loop']:.2f} "
          "(> 1: async is faster)")
    (out / "results.json").write_text(json.dumps({"runs": runs, "median": med, "ratios": ratios,
                                                  "rollouts": args.rollouts, "threads": args.threads,
                                                  "load_average": load}, indent=2))
    print(f"  details: {out / 'results.json'}")


if __name__ == "__main__":
    main()
