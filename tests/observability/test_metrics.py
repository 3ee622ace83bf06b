"""Metrics go to JSONL (and wandb offline when enabled)."""

import math

import pytest
import torch

from megatron_vespo.observability import MetricsLogger, read_metrics
from megatron_vespo.observability.config import LoggingConfig


def test_jsonl_rows(tmp_path):
    m = MetricsLogger(tmp_path)
    m.log({"loss": torch.tensor(0.5), "ess": 0.9, "bad": float("nan")}, step=1)
    m.log({"loss": 0.25}, step=2)
    m.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["loss"] == 0.5 and rows[0]["bad"] == "nan"
    assert rows[1] == {"step": 2, "loss": 0.25}


def test_disabled_rank_writes_nothing(tmp_path):
    m = MetricsLogger(tmp_path / "x", enabled=False)
    m.log({"loss": 1.0}, step=0)
    m.close()
    assert not (tmp_path / "x").exists()


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    m = MetricsLogger(tmp_path, LoggingConfig(wandb=True, wandb_mode="offline", run_name="t"))
    m.log({"loss": 1.5}, step=3)
    m.close()
    assert math.isclose(read_metrics(tmp_path / "metrics.jsonl")[0]["loss"], 1.5)
    assert any((tmp_path / "wandb").glob("offline-run-*"))


def _write_run(path, steps, torn=False):
    rows = "".join(f'{{"step": {s}, "loss": {s / 10}}}\n' for s in steps)
    path.write_text(rows + ('{"step": 9, "lo' if torn else ""))


def test_fresh_run_moves_an_earlier_runs_file_aside(tmp_path):
    _write_run(tmp_path / "metrics.jsonl", [1, 2, 3])
    (tmp_path / "metrics.1.jsonl").write_text("")  # an even older run keeps its name
    m = MetricsLogger(tmp_path, start_step=0)
    m.log({"loss": 9.0}, step=1)
    m.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 9.0}]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.2.jsonl")] == [1, 2, 3]


def test_resume_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
    _write_run(tmp_path / "metrics.jsonl", [1, 2, 3, 4, 5, 6], torn=True)  # killed after step 6, checkpoint at 4
    m = MetricsLogger(tmp_path, start_step=4)
    m.log({"loss": 0.5}, step=5)
    m.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] == 0.5
    assert not list(tmp_path.glob("metrics.*.jsonl"))


def test_default_appends(tmp_path):
    _write_run(tmp_path / "metrics.jsonl", [1, 2])
    m = MetricsLogger(tmp_path)
    m.log({"loss": 0.0}, step=1)
    m.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 1]
