"""Config of the prompt data set (owned by ``data/``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from megatron_vespo.config.base import Section


class DataConfig(Section):
    """Prompts come from a JSONL file or a built-in synthetic task; ``reward`` scores each response.

    JSONL rows are checked at load (``file:line`` in every error).
    """

    source: Literal["jsonl", "synthetic"] = "synthetic"
    """jsonl: prompts from path; synthetic: a built-in task."""
    path: Optional[str] = None
    """JSONL prompt file (required with source=jsonl)."""
    prompt_key: str = "prompt"
    """JSONL field holding the prompt (text or token ids)."""
    label_key: str = "label"
    """JSONL field holding the label the reward compares against."""
    num_prompts: int = Field(64, ge=1)
    """Prompts of the synthetic task."""
    max_prompt_len: int = Field(64, ge=1)
    """Longer prompts are cut (with a warning) or refused, see on_long_prompt."""
    on_long_prompt: Literal["truncate", "error"] = "truncate"
    """truncate: cut and count them; error: refuse the file."""
    seed: int = 0
    """Seed of the synthetic task and the prompt order."""
    num_labels: int = Field(4, ge=1, le=64)
    """Distinct labels of the synthetic task (1 = unconditional, the easiest signal)."""
    reward: str = "token_class"
    """Reward function in rewards/ scoring a response against its label."""

    @field_validator("reward")
    @classmethod
    def _known_reward(cls, name: str) -> str:
        from megatron_vespo.rewards import available_rewards

        if name not in available_rewards():
            raise ValueError(f"unknown reward '{name}'; available: {', '.join(available_rewards())}")
        return name

    @model_validator(mode="after")
    def _path_for_jsonl(self) -> "DataConfig":
        # checked here, not when the data loads: that comes after the Megatron actor is built
        if self.source == "jsonl" and not self.path:
            raise ValueError("data.source=jsonl reads prompts from a file: set data.path")
        return self
