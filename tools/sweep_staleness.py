"""Staleness sweep (issue: evidence): losses x N x seeds with the paper's protocol, held-out evaluation.

Every cell is a real ``megatron-vespo train`` run of ``--config`` (Megatron actor, embedded engines,
weight sync) with the protocol of ``megatron_vespo.evidence.sweep``. Cells run ``--jobs`` at a time,
each result is committed to ``<out>/cells/`` as it finishes, a rerun skips finished cells, and the
aggregate lands in ``<out>/staleness.json`` (one cell per (loss, N, seed)), ``table.md`` and
``staleness.png``.

    python tools/sweep_staleness.py --out docs/results/staleness                # the full grid
    python tools/sweep_staleness.py --quick --out /tmp/sweep_quick              # a few minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_vespo.evidence.sweep import (  # noqa: E402
    Protocol,
    aggregate,
    grid,
    load_done,
    markdown_table,
    run_cell,
)


def versions() -> dict[str, str]:
    """Library versions and the commit behind the numbers."""
    import subprocess

    import megatron.core
    import torch
    import transformers

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "megatron-core": megatron.core.__version__, "commit": commit, "cpus": str(os.cpu_count())}


def plot(agg: list[dict], path: Path, metric: str) -> None:
    """Held-out score against N per loss, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for loss in dict.fromkeys(a["loss"] for a in agg):
        rows = sorted((a for a in agg if a["loss"] == loss and a["mode"] == "sync"), key=lambda a: a["N"])
        ax.errorbar([a["N"] for a in rows], [a["mean"] for a in rows], yerr=[a["std"] for a in rows],
                    label=loss, marker="o", ms=3, capsize=2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("staleness N (updates per rollout batch)")
    ax.set_ylabel(f"held-out {metric} (final policy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Run missing cells, then aggregate everything finished."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "configs" / "tiny_cpu_vespo.yaml"))
    ap.add_argument("--losses", nargs="+", default=["vespo", "grpo", "gspo", "sapo", "cispo"])
    ap.add_argument("--staleness", nargs="+", type=int, default=[1, 4, 8, 16, 32, 64])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--async-lags", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--updates", type=int, default=64)
    ap.add_argument("--mini-batch", type=int, default=16)
    ap.add_argument("--eval-every-updates", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=2, help="cells run at once (2 cores: 2)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every cell")
    ap.add_argument("--quick", action="store_true", help="vespo/grpo, N in {1, 4}, 1 seed, 8 updates")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.losses, args.staleness, args.seeds, args.async_lags = ["vespo", "grpo"], [1, 4], [0], []
        args.updates, args.eval_every_updates = 8, 4
    out = Path(args.out)
    protocol = Protocol(args.updates, args.mini_batch, args.eval_every_updates)
    cells = grid(args.losses, args.staleness, args.seeds, args.async_lags)
    done = load_done(out)
    todo = [c for c in cells if c.cell_id not in done]
    logging.info("%d cells, %d finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_cell, c, args.config, out, protocol, args.extra): c for c in todo}
        for fut in as_completed(futures):
            c = futures[fut]
            try:
                r = fut.result()
                logging.info("%s: eval %.3f (best %.3f) in %.0fs", c.cell_id, r["eval"], r["eval_best"], r["seconds"])
            except Exception as exc:  # noqa: BLE001 - one failed cell must not stop the others
                logging.error("%s", exc)
    finished = [d for cid, d in load_done(out).items() if cid in {c.cell_id for c in cells}]
    if not finished:
        return
    agg = aggregate(finished)
    metric = finished[0]["metric"]
    doc = {"task": args.config, "metric": metric, "updates": args.updates, "mini_batch": args.mini_batch,
           "versions": versions(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "cells": [{k: v for k, v in d.items() if k != "eval_curve"} for d in finished],
           "aggregate": agg, "aggregate_best": aggregate(finished, "eval_best")}
    tmp = out / "staleness.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / "staleness.json")
    table = markdown_table(agg)
    (out / "table.md").write_text(table + "\n")
    plot(agg, out / "staleness.png", metric)
    logging.info("final-policy held-out %s, mean ± std (seeds):\n%s", metric, table)


if __name__ == "__main__":
    main()
