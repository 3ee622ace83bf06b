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

    The async knobs (``pause_mode``, ``buffer_groups``, ``max_inflight_groups``, ``ray_*``) are
    ignored in sync mode.
    """

    mode: Literal["sync", "async"] = "sync"
    """sync: generate, train N updates, sync weights, repeat; async: rollout and training run concurrently
    (docs/orchestration.md)."""
    num_rollouts: int = Field(1, ge=1)
    """Rollout batches to generate and train on."""
    max_policy_lag: int = Field(1, ge=0)
    """Async: groups whose policy lag (trainer version - version of the first token) exceeds this are dropped."""
    weight_sync: Optional[Literal["disk", "tensor", "distributed"]] = Field(None, exclude=True)
    """Deprecated alias of weight_sync.kind: moved there when the job config is validated (always None after)."""
    output_dir: str = "outputs/run"
    """Run directory: metrics, exported weights, evaluation outputs."""
    pause_mode: Literal["abort", "in_place", "retract"] = "abort"
    """Async: how engines cross a weight update (SGLang pause_generation): abort = regenerate in-flight prompts;
    in_place = finish them with the new weights; retract = as in_place with the KV cache re-prefilled."""
    buffer_groups: Optional[int] = Field(None, ge=1)
    """Async: finished groups waiting for the trainer, at most (default: (max_policy_lag + 1) x groups per rollout
    batch)."""
    max_inflight_groups: Optional[int] = Field(None, ge=1)
    """Async: groups being generated at once (default: groups per rollout batch)."""
    ray_address: Optional[str] = None
    """Async: Ray cluster to join (default: $RAY_ADDRESS, else a local Ray stopped at the end)."""
    ray_num_cpus: int = Field(2, ge=1)
    """Async: CPUs of the local Ray started when no cluster is given."""
    overlap_weight_load: Optional[bool] = None
    """Async, max_policy_lag >= 1, weight_sync.kind=disk (or tensor on CPU): after the (collective) export or
    shared-memory staging, rank 0 makes the engines load the new version in a background thread while the trainer
    pulls and trains the next batch; the load is joined before the next weight update, a held-out evaluation and
    shutdown (docs/orchestration.md).
    None (default) = on wherever it applies; false = the trainer waits for the load."""
    freeze_gc: bool = True
    """After the first rollout (the warm-up), collect garbage once and freeze Python's start-up heap (gc.freeze) in
    the trainer, the engines (SGLang's /freeze_gc) and the async rollout worker, so later collections skip the
    ~500k objects of megatron/torch/transformers: a full collection of them stalled a CPU run for ~0.4 s every
    ~10 iterations (utils/gc_control.py). ``time/gc_s`` reports the collector's time per iteration either way."""
    eval_every: int = Field(0, ge=0)
    """Held-out evaluation (eval.*) every this many rollouts and at the end; 0 = off."""
