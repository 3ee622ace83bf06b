"""Config of training checkpoints (owned by ``checkpoint/``)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from megatron_vespo.config.base import Section


class CheckpointConfig(Section):
    """Where and how often to save; ``load`` resumes from a checkpoint directory."""

    save_dir: Optional[str] = None
    save_interval: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    load: Optional[str] = None
