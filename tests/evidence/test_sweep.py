"""Staleness sweep: the protocol's overrides, summaries from metrics rows, resumption, and one real cell."""

import json

import pytest

from megatron_vespo.config.base import load_config
from megatron_vespo.config.job import JobConfig
from megatron_vespo.evidence.sweep import (
    Cell,
    Protocol,
    aggregate,
    grid,
    load_done,
    markdown_table,
    run_cell,
    summarize,
)

CFG = "examples/configs/tiny_cpu_vespo.yaml"


def test_protocol_keeps_updates_and_mini_batch_fixed_across_n():
    p = Protocol(updates=64, mini_batch=16, eval_every_updates=16)
    for n in (1, 4, 16, 64):
        job = load_config(JobConfig, CFG, Cell("grpo", n, 0).overrides(p))
        assert job.train.mini_batch_size == 16 and job.train.staleness == n
        assert job.loop.num_rollouts * n == 64  # the same number of optimizer updates for every N
        assert job.loop.eval_every == max(1, 16 // n)
        assert job.loss.params["clip_ratio_high"] == 0.28  # published default, not the registry's 0.2
    job = load_config(JobConfig, CFG, Cell("vespo", 1, 2, "async", 4).overrides(p))
    assert job.loop.mode == "async" and job.loop.max_policy_lag == 4
    assert job.train.old_log_prob_source == "rollout"  # W must see the lag
    ablation = load_config(JobConfig, CFG, Cell("vespo@len_sqrtT", 4, 0).overrides(p))
    assert ablation.loss.name == "vespo" and ablation.loss.params["length_norm_power"] == 0.5
    with pytest.raises(ValueError, match="multiple of N"):
        Cell("vespo", 3, 0).overrides(p)


def test_grid_and_ids_are_unique():
    cells = grid(["vespo", "grpo"], [1, 4], [0, 1], [1, 2])
    assert len(cells) == 2 * 2 * 2 + 2 * 2 * 2
    assert len({c.cell_id for c in cells}) == len(cells)
    assert [c.seed for c in cells] == [0] * 8 + [1] * 8  # seed-major: a partial sweep has whole seeds


def _rows():
    return [{"step": 1, "grad_norm": 1.0, "loss/vespo/ess": 0.9, "kl_old": 0.0},
            {"rollout": 1.0, "rollout/reward_mean": 0.2, "eval/avg@4": 0.3, "eval/greedy": 0.25},
            {"step": 2, "grad_norm": 3.0, "loss/vespo/ess": 0.5, "kl_old": 0.1},
            {"rollout": 2.0, "rollout/reward_mean": 0.4, "eval/avg@4": 0.2, "eval/greedy": 0.5}]


def test_summarize_reports_final_and_best_held_out():
    s = summarize(_rows())
    assert s["metric"] == "eval/avg@4" and s["eval"] == 0.2 and s["eval_best"] == 0.3
    assert s["eval_best_rollout"] == 1.0 and s["reward_first"] == 0.2 and s["reward_last"] == 0.4
    assert s["updates"] == 2 and s["grad_norm_max"] == 3.0 and s["ess_mean"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="eval_every"):
        summarize([r for r in _rows() if "eval/avg@4" not in r])


def test_aggregate_and_table():
    cells = [{"loss": "vespo", "mode": "sync", "n": 4, "lag": 0, "eval": v} for v in (0.5, 0.7)]
    agg = aggregate(cells)
    assert agg[0]["mean"] == pytest.approx(0.6) and agg[0]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert "0.600 ± 0.141 (2)" in markdown_table(agg)


def test_torn_cell_file_is_run_again(tmp_path):
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "a.json").write_text('{"eval": 1')
    (tmp_path / "cells" / "b.json").write_text('{"eval": 1}')
    assert set(load_done(tmp_path)) == {"b"}


def test_one_real_cell(tmp_path):
    """The CI smoke run of the sweep: one cell, 2 updates at N = 2, held-out eval at the end."""
    r = run_cell(Cell("vespo", 2, 0), CFG, tmp_path, Protocol(updates=2, mini_batch=8, eval_every_updates=2),
                 ["rollout.num_engines=1", "eval.num_prompts=4", "eval.k=2", "rollout.sampling.max_new_tokens=8"])
    assert r["updates"] == 2 and 0.0 <= r["eval"] <= 1.0 and r["metric"] == "eval/avg@2"
    saved = json.loads((tmp_path / "cells" / "vespo_N2_s0.json").read_text())
    assert saved["eval"] == r["eval"] and "loop.num_rollouts=1" in saved["command"]
    # the same seed gives the same curve on the same machine (the acceptance): a second run
    again = run_cell(Cell("vespo", 2, 0), CFG, tmp_path / "again", Protocol(updates=2, mini_batch=8,
                     eval_every_updates=2), ["rollout.num_engines=1", "eval.num_prompts=4", "eval.k=2",
                                             "rollout.sampling.max_new_tokens=8"])
    for key in ("eval", "eval_greedy", "reward_curve", "ess_curve", "grad_norm_max"):
        assert again[key] == r[key], key
