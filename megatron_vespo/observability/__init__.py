"""Metrics: JSONL always, wandb (offline by default) when enabled."""

from megatron_vespo.observability.metrics import MetricsLogger, read_metrics

__all__ = ["MetricsLogger", "read_metrics"]
