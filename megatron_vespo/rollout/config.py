"""Config of the rollout engine (owned by ``rollout/``)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from megatron_vespo.config.base import Section


class SamplingConfig(Section):
    """Sampling parameters, SGLang names."""

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_new_tokens: int = Field(64, ge=1)
    stop_token_ids: list[int] = Field(default_factory=list)


class RolloutConfig(Section):
    """Where rollouts come from.

    ``engine: embedded`` starts our CPU server (HF transformers) speaking SGLang's protocol;
    ``engine: sglang`` launches ``python -m sglang.launch_server`` (GPU) or attaches to
    ``urls``. ``server_args`` pass through to SGLang unchanged.
    """

    engine: Literal["embedded", "sglang"] = "embedded"
    urls: list[str] = Field(default_factory=list)
    num_engines: int = Field(1, ge=1)
    host: str = "127.0.0.1"
    base_port: int = Field(30000, ge=1024, le=65535)
    n_samples_per_prompt: int = Field(4, ge=1)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    return_routed_experts: bool = False
    request_timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(3, ge=0)
    server_args: dict[str, Any] = Field(default_factory=dict)
    model_path: Optional[str] = None
