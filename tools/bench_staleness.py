"""Staleness sweep: final reward of each loss when one rollout batch feeds N optimizer updates.

Runs ``megatron-vespo train`` on the tiny CPU task for every (loss, N) with the same number of
optimizer updates (so larger N means fewer, larger rollout batches and staler data), then prints
a table of the mean reward over the last rollouts and writes a PNG of the reward curves. This
measures learning, not speed: the figures do not depend on machine load.

    python tools/bench_staleness.py --losses vespo grpo gspo --staleness 1 4 16 --updates 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny_cpu_vespo.yaml"


def run_one(loss: str, n: int, updates: int, mini: int, out: Path, extra: list[str]) -> list[dict]:
    """Train with staleness ``n`` for ``updates`` optimizer updates; return the per-rollout rows."""
    rollouts = max(updates // n, 1)
    sets = [f"loss.name={loss}", "loss.params={}", f"train.mini_batch_size={mini}",
            f"train.rollout_batch_size={mini * n}", f"loop.num_rollouts={rollouts}",
            f"loop.output_dir={out}", "train.micro_batch_size=4", *extra]
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "--log-level", "WARNING", "train", str(TINY)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{loss} N={n} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "rollout" in r]


def main() -> None:
    """Parse arguments, run the sweep, print the table, write JSON and a PNG."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--losses", nargs="+", default=["vespo", "grpo", "gspo"])
    ap.add_argument("--staleness", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--updates", type=int, default=64, help="optimizer updates per run")
    ap.add_argument("--mini-batch", type=int, default=8)
    ap.add_argument("--last", type=int, default=3, help="rollouts averaged for the final reward")
    ap.add_argument("--out", default=None, help="directory for runs, JSON and PNG (default: a temp dir)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra job override")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_staleness_"))
    results = {}
    for loss in args.losses:
        for n in args.staleness:
            rows = run_one(loss, n, args.updates, args.mini_batch, out / f"{loss}_N{n}", args.extra)
            rewards = [r["rollout/reward_mean"] for r in rows]
            k = min(args.last, len(rewards))
            results[f"{loss}/N={n}"] = {"final_reward": sum(rewards[-k:]) / k, "first_reward": rewards[0],
                                        "rollouts": len(rewards)}
            print(f"{loss:8s} N={n:3d}: reward {rewards[0]:.3f} -> {results[f'{loss}/N={n}']['final_reward']:.3f}"
                  f" over {len(rewards)} rollouts", flush=True)
    print(f"\nfinal reward (mean of last {args.last} rollouts), {args.updates} updates per run")
    print("loss     " + "".join(f"  N={n:<5d}" for n in args.staleness))
    for loss in args.losses:
        print(f"{loss:8s} " + "".join(f"  {results[f'{loss}/N={n}']['final_reward']:.3f}  " for n in args.staleness))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    try:
        from megatron_vespo.observability.plots import plot_runs

        plot_runs([out / f"{loss}_N{n}" for loss in args.losses for n in args.staleness], out / "staleness.png",
                  panels=[("reward (per rollout)", ("rollout/reward_mean",))])
    except ImportError:
        pass
    print(f"runs, results.json and staleness.png in {out}")


if __name__ == "__main__":
    main()
