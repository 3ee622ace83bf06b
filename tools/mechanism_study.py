"""Mechanism study over seeds: each loss's gradient on k-update-stale samples vs the on-policy gradient.

Runs ``megatron_vespo.evidence.mechanism`` once per seed (each seed: its own policy trajectory,
prompts and samples), writes one JSON per seed into ``--out`` as it finishes (atomically; a rerun
skips seeds already written, so the command resumes), then the aggregate (mean +- std over seeds)
as ``summary.json``, a markdown table and a PNG.

    python tools/mechanism_study.py --seeds 0 1 2 --out docs/results/mechanism
    python tools/mechanism_study.py --quick --out /tmp/mech      # seconds-scale smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_vespo.evidence.mechanism import MechanismConfig, run_mechanism  # noqa: E402

METRICS = ("cos_of_mean", "cos_mean", "bias_rel", "rel_var", "ess_frac", "khat_mean", "khat_gt_0_7", "log_w_p50",
           "log_w_p95")


def versions() -> dict[str, str]:
    """Library versions and the commit behind the numbers."""
    import transformers

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit, "machine": platform.machine(),
            "cpus": str(os.cpu_count())}


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def aggregate(results: list[dict]) -> list[dict]:
    """Mean and std over seeds of every metric, per (k, loss)."""
    cells: dict[tuple[int, str], list[dict]] = {}
    for res in results:
        for row in res["rows"]:
            cells.setdefault((row["k"], row["loss"]), []).append(row)
    out = []
    for (k, loss), rows in sorted(cells.items()):
        agg = {"k": k, "loss": loss, "seeds": len(rows)}
        for m in METRICS:
            v = torch.tensor([r[m] for r in rows], dtype=torch.float64)
            agg[m] = float(v.mean())
            agg[m + "_std"] = float(v.std()) if len(rows) > 1 else 0.0
        out.append(agg)
    return out


def markdown(summary: list[dict]) -> str:
    """Table: cosine of the resample-mean gradient with the on-policy gradient, per loss and k."""
    ks = sorted({r["k"] for r in summary})
    losses = list(dict.fromkeys(r["loss"] for r in summary))
    by = {(r["k"], r["loss"]): r for r in summary}
    lines = ["| loss | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for loss in losses:
        cells = [f"{by[k, loss]['cos_of_mean']:.2f} ± {by[k, loss]['cos_of_mean_std']:.2f}" for k in ks]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    ess = [f"{by[k, losses[0]]['ess_frac']:.2f}" for k in ks]
    lines.append("| ESS/B of W | " + " | ".join(ess) + " |")
    if "khat_mean" in by[ks[0], losses[0]]:
        khat = [f"{by[k, losses[0]]['khat_mean']:.2f} ({by[k, losses[0]]['khat_gt_0_7']:.0%})" for k in ks]
        lines.append("| PSIS k-hat of W (share > 0.7) | " + " | ".join(khat) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """Cosine (resample mean vs on-policy) against staleness, one line per loss, error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab20").colors
    for i, loss in enumerate(dict.fromkeys(r["loss"] for r in summary)):
        rows = [r for r in summary if r["loss"] == loss]
        ks = [max(r["k"], 0.5) for r in rows]
        style = dict(label=loss, capsize=2, marker="o", ms=3, color=colors[(2 * i) % 20 + (i >= 10)],
                     linestyle="--" if "@" in loss else "-")  # ablation variants dashed
        axes[0].errorbar(ks, [r["cos_of_mean"] for r in rows], yerr=[r["cos_of_mean_std"] for r in rows], **style)
        axes[1].errorbar(ks, [r["rel_var"] for r in rows], yerr=[r["rel_var_std"] for r in rows], **style)
    for ax, title in zip(axes, ("cos(mean stale grad, on-policy grad)", "resample variance / ||mean||^2")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("staleness k (updates; k=0 plotted at 0.5)")
        ax.set_title(title, fontsize=9)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Parse arguments, run missing seeds, aggregate and report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--staleness", nargs="+", type=int, default=[0, 1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--losses", nargs="+", default=list(MechanismConfig.losses))
    ap.add_argument("--updates", type=int, default=None, help="trajectory length K (default: max staleness)")
    ap.add_argument("--resamples", type=int, default=8)
    ap.add_argument("--reference-batches", type=int, default=16)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--policy", choices=["tabular", "moe"], default="tabular",
                    help="tabular: exact on-policy gradient; moe: a tiny Qwen3-MoE (target estimated, noisier)")
    ap.add_argument("--quick", action="store_true", help="tiny grid for a smoke run (seconds)")
    ap.add_argument("--out", required=True, help="directory for per-seed JSON, summary, table and PNG")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.staleness, args.resamples, args.reference_batches, args.response_len = [0, 2], 2, 2, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        path = out / f"seed{seed}.json"
        if path.exists():
            logging.info("seed %d: %s exists, skipped", seed, path)
            results.append(json.loads(path.read_text()))
            continue
        cfg = MechanismConfig(staleness=tuple(args.staleness), losses=tuple(args.losses),
                              trajectory_updates=args.updates or max(args.staleness), resamples=args.resamples,
                              reference_batches=args.reference_batches, response_len=args.response_len,
                              lr=args.lr, seed=seed, policy=args.policy)
        res = run_mechanism(cfg)
        res["versions"] = versions()
        res["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        write_json(path, res)
        results.append(res)
    summary = aggregate(results)
    write_json(out / "summary.json", {"seeds": args.seeds, "versions": versions(), "rows": summary})
    table = markdown(summary)
    (out / "table.md").write_text(table + "\n")
    plot(summary, out / "mechanism.png")
    logging.info("cosine of the resample-mean stale gradient with the on-policy gradient:\n%s", table)


if __name__ == "__main__":
    main()
