"""Config of training checkpoints (owned by ``checkpoint/``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from megatron_vespo.config.base import Section


class CheckpointConfig(Section):
    """Where and how often to save; ``load`` resumes from a checkpoint directory.

    ``save_dir`` receives ``iter_XXXXXXX/`` directories (model, optimizer, LR schedule, RNG,
    data position, policy version) and ``latest_checkpointed_iteration.txt``; the newest
    ``keep_last`` are kept. ``load`` is a save directory (its latest iteration), one
    ``iter_*`` directory, or a model checkpoint from ``convert hf-to-mcore`` (weights only).
    ``load_optimizer`` / ``load_rng`` = false restore the weights (and trainer state) but start
    a fresh optimizer / keep the current seeds, e.g. to continue under another parallel layout.
    ``hf_export_interval`` > 0 also writes an HF directory (``hf_export_dtype``) every that many
    iterations under ``save_dir/hf/iter_XXXXXXX`` for evaluation or serving.
    """

    save_dir: Optional[str] = None
    save_interval: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    load: Optional[str] = None
    load_optimizer: bool = True
    load_rng: bool = True
    hf_export_interval: int = Field(0, ge=0)
    hf_export_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    @model_validator(mode="after")
    def _save_dir_when_saving(self) -> "CheckpointConfig":
        if (self.save_interval or self.hf_export_interval) and not self.save_dir:
            raise ValueError("checkpoint.save_dir must be set when checkpoint.save_interval or "
                             "checkpoint.hf_export_interval is > 0")
        return self
