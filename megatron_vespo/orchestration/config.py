"""Config of the RL loop (owned by ``orchestration/``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from megatron_vespo.config.base import Section


class LoopConfig(Section):
    """Loop mode.

    ``sync``: generate a rollout batch, train N updates on it, sync weights, repeat.
    ``async``: rollout and training run concurrently (a Ray actor generates into a bounded
    buffer); groups whose policy lag (trainer version - version that generated the sample's
    first token) exceeds ``max_policy_lag`` are dropped. See ``docs/orchestration.md``.

    Async knobs (ignored in sync mode):

    * ``pause_mode``: how the engines cross a weight update (SGLang's ``pause_generation``
      modes). ``abort`` (default): in-flight requests are aborted and their prompts generated
      again from scratch by the new weights, so every trained sample comes from one version.
      ``in_place``: in-flight requests are frozen, then finish with the new weights (their KV
      cache from the old ones is kept); the sample keeps the version of its first token.
      ``retract``: as in_place, but SGLang frees their KV cache and re-prefills it.
    * ``buffer_groups``: finished groups waiting for the trainer, at most (default
      ``(max_policy_lag + 1) x`` groups per rollout batch); generation stops when full.
    * ``max_inflight_groups``: groups being generated at once (default: groups per rollout batch).
    * ``ray_address``: Ray cluster to join (default: ``$RAY_ADDRESS``, else a local Ray
      started with ``ray_num_cpus`` CPUs and stopped at the end).
    """

    mode: Literal["sync", "async"] = "sync"
    num_rollouts: int = Field(1, ge=1)
    max_policy_lag: int = Field(1, ge=0)
    weight_sync: Literal["disk", "tensor", "distributed"] = "disk"
    output_dir: str = "outputs/run"
    pause_mode: Literal["abort", "in_place", "retract"] = "abort"
    buffer_groups: Optional[int] = Field(None, ge=1)
    max_inflight_groups: Optional[int] = Field(None, ge=1)
    ray_address: Optional[str] = None
    ray_num_cpus: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0)  # held-out evaluation (eval.*) every this many rollouts and at the end; 0 = off
