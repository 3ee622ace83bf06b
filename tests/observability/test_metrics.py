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
