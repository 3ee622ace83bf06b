"""A/B of two settings of the async loop, alternating: by default ``loop.overlap_weight_load`` true vs false.

Runs ``examples/configs/cpu_addition_async.yaml`` on a prepared addition task
(``python tools/addition_task.py prepare --out outputs/cpu_addition``) ``--rounds`` times per
setting, the order alternating per round, and prints per run completions/s and the per-phase
means from ``metrics.jsonl`` (warm-up rollouts skipped), the load average before and after,
then the median completions/s per setting and the per-round ratios (A / B). ``--a`` / ``--b``
(repeatable ``KEY=VALUE``) replace the two settings, e.g.
``--a weight_sync.kind=tensor --b weight_sync.kind=disk``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPLETIONS = 64  # rows per rollout in cpu_addition_async.yaml
PHASES = {"train_ms": "time/train_s", "wait_ms": "time/wait_s", "export_ms": "weight_sync/export_s",
          "load_ms": "weight_sync/load_s", "load_wait_ms": "time/weight_load_wait_s",
          "paused_ms": "time/engines_paused_s"}


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def run_once(task: Path, out: Path, setting: list[str], rollouts: int, warmup: int, seed: int,
             config: str = "cpu_addition_async.yaml") -> dict:
    """One training run with the ``KEY=VALUE`` overrides of ``setting``; returns completions/s, per-phase
    means (ms) and the load average around it."""
    sets = {"model.hf_path": task / "sft", "data.path": task / "train.jsonl", "loop.num_rollouts": warmup + rollouts,
            "loop.output_dir": out, "rollout.sampling.sampling_seed": seed,
            **dict(kv.split("=", 1) for kv in setting)}
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(REPO / "examples/configs" / config)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("OMP_NUM_THREADS", "1")
    before = _loadavg()
    with open(f"{out}.log", "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode:
        raise RuntimeError(f"run failed (exit {proc.returncode}); see {out}.log")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summ = [r for r in rows if "rollout" in r and "time/iteration_s" in r][warmup:]
    its = [r["time/iteration_s"] for r in summ]
    res = {"completions_per_s": COMPLETIONS * len(its) / sum(its), "iteration_ms": 1e3 * statistics.mean(its)}
    res.update({k: 1e3 * statistics.mean(r.get(key, 0.0) for r in summ) for k, key in PHASES.items()})
    res["lag_max"] = max(r.get("async/lag_max", 0) for r in summ)
    res["loadavg"] = f"{before}->{_loadavg()}"
    return res


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task-dir", default="outputs/cpu_addition")
    p.add_argument("--out", default="outputs/bench_overlap")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=10, help="timed rollouts per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed rollouts first")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--config", default="cpu_addition_async.yaml", help="job YAML in examples/configs (e.g. "
                   "cpu_addition_sync.yaml for an A/B of the sync loop)")
    p.add_argument("--a", action="append", metavar="KEY=VALUE", help="setting A (default: overlap on)")
    p.add_argument("--b", action="append", metavar="KEY=VALUE", help="setting B (default: overlap off)")
    args = p.parse_args(argv)
    settings = {"A": args.a or ["loop.overlap_weight_load=true"], "B": args.b or ["loop.overlap_weight_load=false"]}
    for name, kvs in settings.items():
        if any("=" not in kv for kv in kvs):
            p.error(f"--{name.lower()} takes KEY=VALUE, got {kvs}")
    task, out = Path(args.task_dir).resolve(), Path(args.out).resolve()
    if not (task / "sft" / "config.json").is_file():
        p.error(f"--task-dir {task}: no prepared task (python tools/addition_task.py prepare --out {task})")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for rnd in range(args.rounds):
        for name in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
            res = run_once(task, out / f"r{rnd}_{name}", settings[name], args.rollouts, args.warmup, args.seed + rnd,
                           args.config)
            results[name].append(res)
            print(f"round {rnd + 1} {name} ({' '.join(settings[name])}): "
                  + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
                  flush=True)
    med = {k: statistics.median(r["completions_per_s"] for r in v) for k, v in results.items()}
    ratios = [a["completions_per_s"] / b["completions_per_s"] for a, b in zip(results["A"], results["B"])]
    print(f"median completions/s: A {med['A']:.1f}, B {med['B']:.1f}; "
          f"ratio {med['A'] / med['B']:.3f}; per round {[round(x, 3) for x in ratios]}")
    (out / "results.json").write_text(json.dumps({"settings": settings, **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
