"""Staleness sweep (issue: evidence): losses x N x seeds with the paper's protocol, held-out evaluation.

Every cell is a real ``megatron-vespo train`` run of ``--config`` (Megatron actor, embedded engines,
weight sync) with the protocol of ``megatron_vespo.evidence.sweep``. Cells run ``--jobs`` at a time,
each result is committed to ``<out>/cells/`` as it finishes, a rerun skips finished cells, and the
aggregate lands in ``<out>/staleness.json`` (one cell per (loss, N, seed)), ``table.md`` and
``staleness.png``.

    python tools/sweep_staleness.py --out docs/results/staleness                # the full grid
    python tools/sweep_staleness.py --quick --out /tmp/sweep_quick              # 4 cells, 3-4 minutes on 2 cores
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


def plot_curves(cells: list[dict], path: Path) -> None:
    """Per loss: rollout reward (top) and the ESS of pi/pi_old (bottom) against optimizer updates, one
    line per N (mean over seeds), sync cells only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sync = [c for c in cells if c["mode"] == "sync" and c.get("reward_curve")]
    losses = list(dict.fromkeys(c["loss"] for c in sync))
    if not losses:
        return
    fig, axes = plt.subplots(2, len(losses), figsize=(3.2 * len(losses), 5.5), squeeze=False, sharey="row")
    for j, loss in enumerate(losses):
        for n in sorted({c["n"] for c in sync if c["loss"] == loss}):
            runs = [c for c in sync if c["loss"] == loss and c["n"] == n]
            for row, key, step in ((0, "reward_curve", n), (1, "ess_curve", 1)):
                length = min(len(c[key]) for c in runs)
                if not length:
                    continue
                ys = np.nanmean(np.array([c[key][:length] for c in runs], dtype=float), axis=0)
                axes[row, j].plot(np.arange(1, length + 1) * step, ys, label=f"N={n}", lw=1)
        axes[0, j].set_title(loss)
        axes[1, j].set_xlabel("optimizer update")
    axes[0, 0].set_ylabel("rollout reward (behaviour policy)")
    axes[1, 0].set_ylabel("ESS(pi / pi_old) / n")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def ensure_task(config: str) -> None:
    """Prepare the staleness task (SFT warm-up, prompts) when the job is the staleness task and its
    model directory does not exist yet (``tools/staleness_task.py prepare``, about 30 minutes)."""
    import subprocess

    import yaml

    hf_path = (yaml.safe_load(Path(config).read_text()).get("model") or {}).get("hf_path")
    if Path(config).name != "cpu_addition_scratchpad.yaml" or not hf_path or (Path(hf_path) / "config.json").exists():
        return
    task_dir = Path(hf_path).parent
    logging.info("preparing the staleness task in %s (tools/staleness_task.py prepare)", task_dir)
    subprocess.run([sys.executable, str(ROOT / "tools" / "staleness_task.py"), "prepare", "--out", str(task_dir)],
                   check=True)


def baseline(config: str, out: Path, extra: list[str]) -> dict:
    """Held-out scores of the starting policy (``model.hf_path``, shared by every cell): ``megatron-vespo
    eval`` once, cached in ``<out>/baseline.json``."""
    import subprocess

    import yaml

    path = out / "baseline.json"
    if path.exists():
        return json.loads(path.read_text())
    if not (yaml.safe_load(Path(config).read_text()).get("model") or {}).get("hf_path"):
        return {"note": "model.preset from random init (each seed its own): no shared start to evaluate"}
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "--log-level", "WARNING", "eval", config,
           "--json", str(path.with_suffix(".tmp"))]
    for s in extra:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    os.replace(path.with_suffix(".tmp"), path)
    return json.loads(path.read_text())


def main() -> None:
    """Run missing cells, then aggregate everything finished."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "configs" / "cpu_staleness.yaml"),
                    help="job every cell runs (default: the staleness task, prepared on first use)")
    ap.add_argument("--losses", nargs="+", default=["vespo", "grpo", "gspo", "sapo", "cispo"])
    ap.add_argument("--staleness", nargs="*", type=int, default=[1, 4, 8, 16, 32, 64])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--async-lags", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--updates", type=int, default=128)
    ap.add_argument("--mini-batch", type=int, default=32)
    ap.add_argument("--eval-every-updates", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=2, help="cells run at once (2 cores: 2)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every cell")
    ap.add_argument("--quick", action="store_true",
                    help="vespo/grpo at N in {1, 32}, seed 0, the full protocol (cells comparable with the grid's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.losses, args.staleness, args.seeds, args.async_lags = ["vespo", "grpo"], [1, 32], [0], []
    out = Path(args.out)
    ensure_task(args.config)
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
    # every finished cell of this output directory, not only this invocation's grid: a second
    # invocation (e.g. issue 14's extra losses and N = 128) adds cells to the same table
    finished = list(load_done(out).values())
    if not finished:
        return
    agg = aggregate(finished)
    try:
        start = baseline(args.config, out, args.extra)
    except Exception as exc:  # noqa: BLE001 - the table does not need it
        logging.error("baseline evaluation failed: %s", exc)
        start = {}
    metric = finished[0]["metric"]
    doc = {"task": args.config, "metric": metric, "updates": args.updates, "mini_batch": args.mini_batch,
           "eval_every_updates": args.eval_every_updates,
           "versions": versions(), "baseline": start, "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "cells": finished,
           "aggregate": agg, "aggregate_best": aggregate(finished, "eval_best")}
    tmp = out / "staleness.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / "staleness.json")
    table = markdown_table(agg)
    (out / "table.md").write_text(table + "\n")
    plot(agg, out / "staleness.png", metric)
    plot_curves(finished, out / "curves.png")
    logging.info("final-policy held-out %s, mean ± std (seeds):\n%s", metric, table)


if __name__ == "__main__":
    main()
