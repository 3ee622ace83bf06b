"""Config of metrics logging (owned by ``observability/``)."""

from __future__ import annotations

from typing import Literal, Optional

from megatron_vespo.config.base import Section


class LoggingConfig(Section):
    """Metrics go to a JSONL file always, and to wandb (offline by default) when enabled."""

    wandb: bool = False
    """Also log to wandb (metrics always go to a JSONL file)."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline writes locally without network."""
    wandb_project: str = "megatron_vespo"
    """wandb project name."""
    run_name: Optional[str] = None
    """wandb run name (default: wandb chooses one)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Level of the package's Python logging."""
