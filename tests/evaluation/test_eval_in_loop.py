"""loop.eval_every: held-out rows in metrics.jsonl, the best policy kept, and `eval` agreeing with it."""

import json

from megatron_vespo.cli import main

CFG = "examples/configs/tiny_cpu_vespo.yaml"


def test_sync_loop_evaluates_and_keeps_the_best_policy(tmp_path):
    out = tmp_path / "run"
    common = ["--set", "rollout.num_engines=1", "--set", "eval.num_prompts=8", "--set", "eval.k=2"]
    rc = main(["train", CFG, "--set", f"loop.output_dir={out}", "--set", "loop.num_rollouts=3",
               "--set", "loop.eval_every=2", *common])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/avg@2" in r]
    assert [r["rollout"] for r in evals] == [2.0, 3.0]  # every 2 rollouts and at the end
    best = max(evals, key=lambda r: r["eval/avg@2"])
    assert evals[-1]["eval/best"] == best["eval/avg@2"]
    assert evals[-1]["eval/best_rollout"] == best["rollout"]
    saved = json.loads((out / "best_policy" / "eval.json").read_text())
    assert saved["rollout"] == best["rollout"] and saved["eval/avg@2"] == best["eval/avg@2"]
    assert not (out / "best_policy.new").exists() and not (out / "best_policy.old").exists()
    # the kept policy, scored on its own by `megatron-vespo eval`, gives the score it was kept for
    rescored = tmp_path / "rescored.json"
    assert main(["eval", CFG, "--policy", str(out / "best_policy"), "--json", str(rescored), *common]) == 0
    r = json.loads(rescored.read_text())
    assert abs(r["eval/avg@2"] - best["eval/avg@2"]) < 1e-9
    assert abs(r["eval/greedy"] - best["eval/greedy"]) < 1e-9
