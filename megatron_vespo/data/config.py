"""Config of the prompt data set (owned by ``data/``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from megatron_vespo.config.base import Section


class DataConfig(Section):
    """Prompts come from a JSONL file (``prompt_key``/``label_key``) or a built-in synthetic task."""

    source: Literal["jsonl", "synthetic"] = "synthetic"
    path: Optional[str] = None
    prompt_key: str = "prompt"
    label_key: str = "label"
    num_prompts: int = Field(64, ge=1)
    max_prompt_len: int = Field(64, ge=1)
    seed: int = 0
