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
    """Sampling temperature; 0 = greedy (SGLang turns it into top_k=1)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    top_k: int = -1
    """Top-k sampling; -1 = the whole vocabulary."""
    max_new_tokens: int = Field(64, ge=1)
    """Response length cap, tokens."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Extra token ids that end a response."""
    ignore_eos: bool = False
    """Keep generating past EOS (up to max_new_tokens)."""
    sampling_seed: Optional[int] = None
    """Base seed: the i-th request of a client gets sampling_seed + i (None = unseeded)."""

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
    """embedded: our CPU server speaking SGLang's protocol; sglang: launch python -m sglang.launch_server (GPU) or
    attach to urls."""
    urls: list[str] = Field(default_factory=list)
    """Attach to these already running engines instead of launching them."""
    num_engines: int = Field(1, ge=1)
    """Engines to launch."""
    host: str = "127.0.0.1"
    """Host the launched engines bind to."""
    base_port: int = Field(30000, ge=1024, le=65535)
    """Port of the first launched engine (engine i uses base_port + i)."""
    n_samples_per_prompt: int = Field(4, ge=1)
    """Responses per prompt (one group; advantages are computed within it)."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling parameters, SGLang names."""
    return_routed_experts: bool = False
    """Ask the engine for the experts it routed each token to (needed by routing.mode=R3)."""
    request_timeout_s: float = Field(600.0, gt=0)
    """Timeout of one engine request, seconds."""
    max_retries: int = Field(3, ge=0)
    """Retries of a failed engine request."""
    retry_backoff_s: float = Field(0.5, gt=0)
    """First back-off between retries, seconds (doubles each retry)."""
    max_concurrency: int = Field(64, ge=1)
    """Requests in flight at once per client."""
    batch_requests: bool = True
    """One /generate per engine per rollout batch (SGLang GenerateReqInput batch: an input_ids list, one
    sampling_params dict per row), the n samples of a prompt kept together on one engine; false: one request per
    sample (for SGLang's router, which routes per request, or a server that takes no batch bodies)."""
    max_batch_size: int = Field(64, ge=1)
    """Embedded engine only: requests per forward batch."""
    batch_wait_ms: float = Field(20.0, ge=0)
    """Embedded engine only: how long the first queued request waits for more to join its batch (a batch body
    starts at once)."""
    engine_threads: Optional[int] = Field(None, ge=1)
    """Embedded engine processes only: torch threads per engine. Unset: OMP_NUM_THREADS if set, else the cores split
    evenly between the engine processes and (in async mode, where both compute at once) the local trainer ranks
    (orchestration/threads.py)."""
    router_policy: Literal["round_robin", "least_outstanding"] = "least_outstanding"
    """How requests are spread over engines."""
    flag_retracted: bool = True
    """With R3, flag retracted (re-prefilled) samples whose routes may not match their log-probs (radixark/miles#3277).
    With R3, flag retracted (re-prefilled) samples whose routes may not match their log-probs (radixark/miles#3277)."""
    tp_size: int = Field(1, ge=1)
    """Tensor-parallel size of each engine."""
    launch_timeout_s: float = Field(900.0, gt=0)
    """Wait for a launched engine to become healthy, seconds."""
    log_dir: Optional[str] = None
    """Where launched SGLang engines write their logs (default: outputs/rollout_logs)."""
    server_args: dict[str, Any] = Field(default_factory=dict)
    """Extra sglang.launch_server flags, underscores for dashes (mem_fraction_static: 0.8), passed through unchanged."""
    model_path: Optional[str] = None
    """HF checkpoint the engine serves."""
    preset: Optional[str] = None
    """Embedded engine: a models.presets name (e.g. tiny) built with random weights instead of model_path."""

    @model_validator(mode="after")
    def _check_server_args(self) -> "RolloutConfig":
        owned = {"model_path", "host", "port", "tp_size", "tp", "enable_return_routed_experts"}
        clash = sorted(owned & {k.replace("-", "_") for k in self.server_args})
        if clash:
            raise ValueError(f"server_args sets {clash}: use the rollout.* fields of the same meaning instead "
                             "(model_path, host, base_port, tp_size, return_routed_experts)")
        return self
