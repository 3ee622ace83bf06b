"""Config of the rollout engine (owned by ``rollout/``).

Field names follow SGLang: ``SamplingConfig`` fields are the keys of SGLang's
``sampling_params`` dict (``sglang/srt/sampling/sampling_params.py``), and ``server_args``
are ``python -m sglang.launch_server`` flags written with underscores
(``mem_fraction_static: 0.8`` -> ``--mem-fraction-static 0.8``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from megatron_vespo.config.base import Section


class SamplingConfig(Section):
    """Sampling parameters, SGLang names.

    ``temperature: 0`` means greedy (SGLang turns it into ``top_k=1``). ``sampling_seed`` is a
    base seed: the client (or router) gives its ``i``-th request the seed ``sampling_seed + i``, so
    the n samples of a prompt differ but a rerun reproduces them. Counters restart with a new
    client: vary the base seed per rollout step (e.g. ``seed + step * 1_000_003``).
    """

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    max_new_tokens: int = Field(64, ge=1)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    sampling_seed: Optional[int] = None

    @model_validator(mode="after")
    def _check_top_k(self) -> "SamplingConfig":
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (whole vocabulary) or >= 1, got {self.top_k}")
        return self

    def to_sglang(self, seed: Optional[int] = None) -> dict[str, Any]:
        """The ``sampling_params`` dict of a ``/generate`` request (SGLang keys only)."""
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens,
        }
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            params["ignore_eos"] = True
        if seed is not None:
            params["sampling_seed"] = int(seed)
        return params


class RolloutConfig(Section):
    """Where rollouts come from.

    ``engine: embedded`` starts our CPU server (HF transformers) speaking SGLang's protocol;
    ``engine: sglang`` launches ``python -m sglang.launch_server`` (GPU) or attaches to
    ``urls``. ``server_args`` pass through to SGLang unchanged.

    ``model_path`` is the HF checkpoint the engine serves; for the embedded engine ``preset``
    (a ``models.presets`` name such as ``tiny``) builds a random-weight model instead.
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
    retry_backoff_s: float = Field(0.5, gt=0)
    max_concurrency: int = Field(64, ge=1)
    # One /generate per engine per rollout batch (GenerateReqInput batch: input_ids list, one
    # sampling_params dict per row), the n samples of a prompt kept together on one engine.
    # false: one request per sample -- for SGLang's router (it routes per request) or a server
    # that does not take batch bodies.
    batch_requests: bool = True
    # Embedded engine only: requests per forward batch, and how long the first queued request
    # waits for more to join its batch (a batch body starts at once).
    max_batch_size: int = Field(64, ge=1)
    batch_wait_ms: float = Field(20.0, ge=0)
    router_policy: Literal["round_robin", "least_outstanding"] = "least_outstanding"
    # A retracted request is re-prefilled and SGLang may pair the old log-probs with the new
    # routes (radixark/miles#3277): with R3 on such samples are flagged unless this is false.
    flag_retracted: bool = True
    tp_size: int = Field(1, ge=1)
    launch_timeout_s: float = Field(900.0, gt=0)
    log_dir: Optional[str] = None
    server_args: dict[str, Any] = Field(default_factory=dict)
    model_path: Optional[str] = None
    preset: Optional[str] = None

    @model_validator(mode="after")
    def _check_server_args(self) -> "RolloutConfig":
        owned = {"model_path", "host", "port", "tp_size", "tp", "enable_return_routed_experts"}
        clash = sorted(owned & {k.replace("-", "_") for k in self.server_args})
        if clash:
            raise ValueError(f"server_args sets {clash}: use the rollout.* fields of the same meaning instead "
                             "(model_path, host, base_port, tp_size, return_routed_experts)")
        return self
