"""Staleness sweep: losses x staleness N x seeds with the paper's protocol, resumable, cell by cell.

Protocol (VESPO paper, Sec. 4.2 / Table 2): the mini-batch is fixed and every run makes the same
number of optimizer updates; a rollout batch holds N mini-batches, so a run has updates / N
rollouts and its k-th update of a batch trains on data k - 1 updates stale. Each loss runs at its
published defaults (``mechanism.DEFAULT_PARAMS``). Held-out evaluation (``loop.eval_every``) every
``eval_every_updates`` updates and at the end; a cell records the final policy's held-out score
(``eval``) and the best one seen (``eval_best``, the paper's "best checkpoint"; selected on the
same held-out set, so optimistic).

Fully async cells (``mode="async"``) run N = 1 with ``loop.max_policy_lag`` = lag and
``train.old_log_prob_source=rollout``, so W = pi / mu includes the lag (with ``recompute`` it would
never see it).

Each cell is one ``megatron-vespo train`` process; its result is written atomically to
``<out>/cells/<cell id>.json`` when it finishes, and a rerun skips cells that have one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_vespo.evidence.mechanism import DEFAULT_PARAMS, VARIANTS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """What every cell shares: ``updates`` optimizer updates of ``mini_batch`` samples each."""

    updates: int = 64
    mini_batch: int = 16
    eval_every_updates: int = 16


@dataclass(frozen=True)
class Cell:
    """One run: a loss at staleness N (sync) or at a policy lag (async, N = 1), one seed."""

    loss: str
    n: int
    seed: int
    mode: str = "sync"
    lag: int = 0

    @property
    def cell_id(self) -> str:
        """File-name-safe identifier."""
        tag = f"N{self.n}" if self.mode == "sync" else f"async_lag{self.lag}"
        return f"{self.loss.replace('@', '_')}_{tag}_s{self.seed}"

    def overrides(self, p: Protocol) -> list[str]:
        """``--set`` overrides implementing the protocol for this cell."""
        if p.updates % self.n:
            raise ValueError(f"updates ({p.updates}) must be a multiple of N ({self.n}) so every N makes the same "
                             "number of updates")
        rollouts = p.updates // self.n
        eval_every = max(1, p.eval_every_updates // self.n)
        params = VARIANTS.get(self.loss, DEFAULT_PARAMS.get(self.loss.split("@")[0], {}))  # "vespo@len_T" etc.
        sets = [f"loss.name={self.loss.split('@')[0]}", f"loss.params={json.dumps(params)}",
                f"train.mini_batch_size={p.mini_batch}", f"train.rollout_batch_size={p.mini_batch * self.n}",
                f"loop.num_rollouts={rollouts}", f"loop.eval_every={eval_every}", f"train.seed={self.seed}",
                f"rollout.sampling.sampling_seed={1000 * self.seed + 7}"]
        if self.mode == "async":
            sets += ["loop.mode=async", f"loop.max_policy_lag={self.lag}", "train.old_log_prob_source=rollout"]
        return sets


def grid(losses: list[str], staleness: list[int], seeds: list[int], async_lags: list[int] = ()) -> list[Cell]:
    """Every (loss, N, seed) cell and the async cells (N = 1, each lag), seed-major: all cells of
    the first seed come first, so a sweep stopped part-way has whole rows of one seed, not three
    seeds of a few losses."""
    cells = []
    for s in seeds:
        cells += [Cell(loss, n, s) for n in staleness for loss in losses]
        cells += [Cell(loss, 1, s, "async", lag) for lag in async_lags for loss in losses]
    return cells


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Cell result from a run's ``metrics.jsonl`` rows: held-out scores, reward curve ends, W statistics."""
    evals = [r for r in rows if any(k.startswith("eval/avg@") for k in r)]
    if not evals:
        raise ValueError("the run logged no held-out evaluation (eval/avg@k): is loop.eval_every set?")
    key = next(k for k in evals[-1] if k.startswith("eval/avg@"))
    rollouts = [r for r in rows if "rollout/reward_mean" in r]
    updates = [r for r in rows if "grad_norm" in r]
    best = max(evals, key=lambda r: r[key])

    def mean(rs: list[dict], k: str) -> float:
        vals = [r[k] for r in rs if k in r and math.isfinite(r[k])]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"metric": key, "eval": evals[-1][key], "eval_best": best[key], "eval_best_rollout": best.get("rollout"),
            "eval_greedy": evals[-1].get("eval/greedy", float("nan")),
            "eval_pass": next((v for k, v in evals[-1].items() if k.startswith("eval/pass@")), float("nan")),
            "eval_curve": [(r.get("rollout"), r[key]) for r in evals],
            "reward_first": rollouts[0]["rollout/reward_mean"] if rollouts else float("nan"),
            "reward_last": rollouts[-1]["rollout/reward_mean"] if rollouts else float("nan"),
            "updates": len(updates), "grad_norm_max": max((u.get("grad_norm", 0.0) for u in updates), default=0.0),
            "ess_mean": mean(updates, "loss/vespo/ess"), "kl_old_mean": mean(updates, "kl_old"),
            # loss-independent weight statistics (train/metrics.py): ESS of pi/pi_old, largest |log W|
            "is_ess_mean": mean(updates, "is/ess"),
            "is_ess_min": min((u["is/ess"] for u in updates if "is/ess" in u), default=float("nan")),
            "seq_log_w_absmax": max((u["is/seq_log_w_absmax"] for u in updates if "is/seq_log_w_absmax" in u),
                                    default=float("nan")),
            "clipfrac_mean": mean(updates, "ratio/clipfrac"),
            "ess_curve": [u.get("is/ess", float("nan")) for u in updates],
            "reward_curve": [r["rollout/reward_mean"] for r in rollouts]}


def run_cell(cell: Cell, config: str, out: Path, protocol: Protocol, extra: list[str] = ()) -> dict[str, Any]:
    """Train one cell (a subprocess), summarise it and write ``<out>/cells/<id>.json`` atomically."""
    run_dir = out / "runs" / cell.cell_id
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "--log-level", "WARNING", "train", config,
           "--set", f"loop.output_dir={run_dir}"]
    for s in [*cell.overrides(protocol), *extra]:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"cell {cell.cell_id} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = {**asdict(cell), **summarize(rows), "seconds": time.perf_counter() - t0,
              "command": " ".join(cmd[1:]), "commit": _commit()}
    path = out / "cells" / f"{cell.cell_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    return result


def _commit() -> str:
    """The code's git commit (with ``+dirty`` when the tree has changes), recorded in every cell."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def load_done(out: Path) -> dict[str, dict]:
    """Finished cells by id (a torn or partial file is not finished)."""
    done = {}
    for path in sorted((out / "cells").glob("*.json")):
        try:
            done[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON: the cell will run again", path)
    return done


def aggregate(cells: list[dict], key: str = "eval") -> list[dict]:
    """Mean and std over seeds of ``key`` per (loss, mode, N or lag)."""
    groups: dict[tuple, list[float]] = {}
    for c in cells:
        groups.setdefault((c["loss"], c["mode"], c["n"], c["lag"]), []).append(c[key])
    out = []
    for (loss, mode, n, lag), vals in sorted(groups.items()):
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        out.append({"loss": loss, "mode": mode, "N": n, "lag": lag, "seeds": len(vals), "mean": m, "std": sd})
    return out


def markdown_table(agg: list[dict]) -> str:
    """Rows = losses, columns = N (sync) then async lags: mean +- std (seeds)."""
    cols = sorted({(a["mode"] != "sync", a["N"] if a["mode"] == "sync" else a["lag"]) for a in agg})
    losses = list(dict.fromkeys(a["loss"] for a in agg))
    by = {(a["loss"], a["mode"] != "sync", a["N"] if a["mode"] == "sync" else a["lag"]): a for a in agg}
    head = ["loss"] + [f"async lag {v}" if is_async else f"N={v}" for is_async, v in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss in losses:
        cells = []
        for col in cols:
            a: Optional[dict] = by.get((loss, *col))
            cells.append(f"{a['mean']:.3f} ± {a['std']:.3f} ({a['seeds']})" if a else "—")
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
