"""Config of metrics logging (owned by ``observability/``)."""

from __future__ import annotations

from typing import Literal, Optional

from megatron_vespo.config.base import Section


class LoggingConfig(Section):
    """Metrics go to a JSONL file always, and to wandb (offline by default) when enabled."""

    wandb: bool = False
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "megatron_vespo"
    run_name: Optional[str] = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
