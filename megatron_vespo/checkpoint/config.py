"""Config of training checkpoints (owned by ``checkpoint/``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from megatron_vespo.config.base import Section


class CheckpointConfig(Section):
    """Where and how often to save; ``load`` resumes from a checkpoint directory.

    An ``iter_XXXXXXX/`` directory holds model, optimizer, LR schedule, RNG, data position and
    policy version.
    """

    save_dir: Optional[str] = None
    """Receives iter_XXXXXXX/ directories and latest_checkpointed_iteration.txt."""
    save_interval: int = Field(0, ge=0)
    """Save every this many iterations; 0 = never."""
    keep_last: int = Field(2, ge=1)
    """Newest checkpoints kept in save_dir."""
    load: Optional[str] = None
    """Resume from a save directory (its latest iteration), one iter_* directory, or a convert hf-to-mcore output
    (weights only)."""
    load_optimizer: bool = True
    """Restore the optimizer state (false: fresh optimizer, e.g. under another parallel layout)."""
    load_rng: bool = True
    """Restore the RNG states (false: keep the current seeds)."""
    hf_export_interval: int = Field(0, ge=0)
    """Also write an HF directory under save_dir/hf/iter_XXXXXXX every this many iterations; 0 = never."""
    hf_export_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype of the HF exports."""

    @model_validator(mode="after")
    def _save_dir_when_saving(self) -> "CheckpointConfig":
        if (self.save_interval or self.hf_export_interval) and not self.save_dir:
            raise ValueError("checkpoint.save_dir must be set when checkpoint.save_interval or "
                             "checkpoint.hf_export_interval is > 0")
        return self
