"""Config of the prompt data set (owned by ``data/``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from megatron_vespo.config.base import Section


class DataConfig(Section):
    """Prompts come from a JSONL file (``prompt_key``/``label_key``) or a built-in synthetic task.

    ``reward`` names the function in ``rewards/`` that scores a response against the label;
    ``num_labels`` is how many distinct labels the synthetic task draws from (1 makes it
    unconditional: the easiest learning signal). JSONL rows are checked at load (``file:line``
    in every error); prompts longer than ``max_prompt_len`` are cut with a warning counting them,
    or refused with ``on_long_prompt: error``.
    """

    source: Literal["jsonl", "synthetic"] = "synthetic"
    path: Optional[str] = None
    prompt_key: str = "prompt"
    label_key: str = "label"
    num_prompts: int = Field(64, ge=1)
    max_prompt_len: int = Field(64, ge=1)
    on_long_prompt: Literal["truncate", "error"] = "truncate"
    seed: int = 0
    num_labels: int = Field(4, ge=1, le=64)
    reward: str = "token_class"

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
