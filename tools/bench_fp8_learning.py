"""Does FP8 train/rollout mismatch change learning? VESPO vs GRPO on the tiny CPU task, over seeds.

Runs ``megatron-vespo train examples/configs/tiny_cpu_vespo.yaml`` (20 rollouts, staleness N = 4)
for every (loss, setting, seed):

* ``hp/R2``: no FP8 (the reference);
* ``fp8/off`` and ``fp8/R2``: an emulated-FP8 trainer (blockwise E4M3, TE's default power-of-two
  scales) against an embedded engine serving the block-FP8 export (FP32 scales, no activation
  quantisation): the worst-matched pairing of ``tools/bench_fp8_mismatch.py``.

Reports, per cell, the mean over seeds of the training reward of the last 3 rollouts, the mean
reward over all rollouts (area under the curve) and the first rollout reaching 0.7; and the
first update's mismatch. This is the task's own reward, not a held-out evaluation.

    python tools/bench_fp8_learning.py --seeds 0 1 [--losses vespo grpo] [--out learning.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny_cpu_vespo.yaml"
FP8 = ["fp8.fp8=e4m3", "fp8.fp8_recipe=blockwise", "fp8.emulate=true", "weight_sync.dtype=fp8",
       "weight_sync.fp8_block_size=[16,16]", "weight_sync.kind=distributed"]
SETTINGS = {"hp/R2": ["routing.mode=R2"], "fp8/off": [*FP8, "routing.mode=disabled"],
            "fp8/R2": [*FP8, "routing.mode=R2"]}


def run(loss: str, setting: str, seed: int, out: Path) -> dict:
    """One training run; returns its reward curve and first-update mismatch."""
    sets = [f"loss.name={loss}", f"loop.output_dir={out}", f"model.seed={1234 + seed}", f"data.seed={seed}",
            f"rollout.sampling.sampling_seed={7 + 1000 * seed}", "rollout.return_routed_experts=true",
            *SETTINGS[setting]]
    if loss != "vespo":
        sets.append("loss.params={}")
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "--log-level", "WARNING", "train", str(TINY)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "NVTE_FP8_BLOCK_SCALING_FP32_SCALES": "0", "OMP_NUM_THREADS": "1"}  # TE's default
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{loss} {setting} seed {seed} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rewards = [r["rollout/reward_mean"] for r in rows if "rollout" in r]
    first = next(r for r in rows if "grad_norm" in r)
    return {"rewards": rewards, "gap": first.get("mismatch/abs_diff_mean", float("nan")),
            "overlap": first.get("routing/expert_overlap", float("nan"))}


def main() -> None:
    """Run the grid, print a markdown table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--losses", nargs="+", default=["vespo", "grpo"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.losses:
            for setting in SETTINGS:
                key = f"{loss}/{setting}"
                results[key] = [run(loss, setting, s, Path(tmp) / f"{loss}_{setting.replace('/', '_')}_{s}")
                                for s in args.seeds]
    print(table(results, args.seeds))
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": args.seeds, "results": results}, indent=2))


def table(results: dict[str, list[dict]], seeds: list[int]) -> str:
    """Markdown table of the runs (means over seeds, plus the per-seed mean reward)."""
    lines = [f"seeds {seeds}; reward of the tiny task (chance 0.25)",
             "| loss | setting | last-3 reward | mean reward (20 rollouts) | per seed | first rollout >= 0.7 | "
             "first-update gap |", "|---|---|---|---|---|---|---|"]
    for key, runs in results.items():
        last = sum(sum(r["rewards"][-3:]) / 3 for r in runs) / len(runs)
        aucs = [sum(r["rewards"]) / len(r["rewards"]) for r in runs]
        hit = [next((i + 1 for i, v in enumerate(r["rewards"]) if v >= 0.7), None) for r in runs]
        gap = [r["gap"] for r in runs if r["gap"] == r["gap"]]
        loss, setting = key.split("/", 1)
        lines.append(f"| {loss} | {setting} | {last:.3f} | {sum(aucs) / len(aucs):.3f} | "
                     f"{', '.join(f'{a:.2f}' for a in aucs)} | {hit} | "
                     f"{(sum(gap) / len(gap)) if gap else float('nan'):.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
