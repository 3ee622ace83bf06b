"""``megatron-vespo train``: the closing summary line comes from rank 0 only."""

import logging
from pathlib import Path

import pytest

from megatron_vespo.cli import main

TINY = str(Path(__file__).resolve().parents[2] / "examples/configs/tiny_cpu_vespo.yaml")


@pytest.mark.parametrize("history, expected", [
    ([{"loss": 0.1}], None),                                       # a non-zero rank: no rollout metrics
    ([{"rollout/reward_mean": 0.25}, {"rollout/reward_mean": 0.75}], "final reward 0.750"),
])
def test_done_line_only_with_rollout_metrics(monkeypatch, caplog, history, expected):
    import megatron_vespo.orchestration.sync_loop as sync_loop

    monkeypatch.setattr(sync_loop, "run_sync", lambda job: history)
    with caplog.at_level(logging.INFO, logger="megatron_vespo.orchestration.cli"):
        assert main(["train", TINY]) == 0
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert done == ([] if expected is None else [done[0]]) and (expected is None or expected in done[0])
    assert not any("nan" in m for m in done)


def test_sglang_engine_without_sglang_fails_before_any_work(monkeypatch, caplog):
    import importlib.util

    import megatron_vespo.orchestration.sync_loop as sync_loop

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sglang" else object())
    monkeypatch.setattr(sync_loop, "run_sync", lambda job: pytest.fail("the loop started"))
    assert main(["train", TINY, "--set", "rollout.engine=sglang"]) == 2
    assert "rollout.engine=sglang" in caplog.text and "megatron_vespo[sglang]" in caplog.text
    # attaching to running servers needs no local sglang
    monkeypatch.setattr(sync_loop, "run_sync", lambda job: [])
    assert main(["train", TINY, "--set", "rollout.engine=sglang", "--set", "rollout.urls=[http://h:1]"]) == 0


def test_math_reward_without_math_verify_fails_before_any_work(monkeypatch, caplog):
    import importlib.util

    import megatron_vespo.orchestration.sync_loop as sync_loop

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name))
    monkeypatch.setattr(sync_loop, "run_sync", lambda job: pytest.fail("the loop started"))
    assert main(["train", TINY, "--set", "data.reward=math"]) == 2
    assert "data.reward=math" in caplog.text and "pip install 'math-verify" in caplog.text


def test_missing_prompt_file_fails_before_any_work(monkeypatch, caplog, tmp_path):
    import megatron_vespo.orchestration.sync_loop as sync_loop

    monkeypatch.setattr(sync_loop, "run_sync", lambda job: pytest.fail("the loop started"))
    missing = tmp_path / "prompts.jsonl"
    assert main(["train", TINY, "--set", "data.source=jsonl", "--set", f"data.path={missing}"]) == 2
    assert f"data.path {missing}: no such file" in caplog.text
