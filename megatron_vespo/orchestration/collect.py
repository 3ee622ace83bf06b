"""One rollout batch: prompts -> engines -> scored, whole, usable groups of ``Sample``s.

``collect_rollout`` asks the engines for ``n_samples_per_prompt`` responses per prompt, scores
them with the data set's reward, drops every group holding a flagged (misaligned routes, NaN
log-probs, NaN reward) or aborted sample, and asks for fresh prompts until ``rollout_batch_size`` samples
in whole groups are ready (at most ``max_attempts`` rounds), so no misaligned data is ever
trained on and group losses always see whole groups.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from megatron_vespo.buffer import drop_unusable_groups
from megatron_vespo.data import Prompt, PromptDataset
from megatron_vespo.rewards import RewardFn, score_samples
from megatron_vespo.rollout.config import RolloutConfig
from megatron_vespo.rollout.router import EngineRouter
from megatron_vespo.types import Sample, SampleStatus

logger = logging.getLogger(__name__)


class RolloutShortfallError(RuntimeError):
    """Too many groups were unusable to fill a rollout batch."""


async def _generate(router: EngineRouter, prompts: list[Prompt], cfg: RolloutConfig, first_group: int) -> list[Sample]:
    # rollout.batch_requests: one batched /generate per engine (groups whole), else one per sample
    return await router.generate_groups([p.tokens for p in prompts], cfg.sampling, cfg.n_samples_per_prompt,
                                        first_group=first_group, batched=cfg.batch_requests,
                                        metadata=[{"label": p.label, "prompt_index": p.index} for p in prompts])


def sample_metrics(samples: list[Sample]) -> dict[str, float]:
    """Reward, response length, truncation and policy versions of the samples a step trains on.

    Shared by both loops (so ``rollout/*`` means the same in sync and async runs): a sample counts
    as truncated when its status is ``SampleStatus.TRUNCATED`` (it hit ``max_new_tokens``).
    """
    if not samples:
        raise ValueError("sample_metrics needs at least one sample")
    n, rewards = len(samples), [s.reward for s in samples]
    return {
        "rollout/reward_mean": sum(rewards) / n,
        "rollout/reward_max": max(rewards),
        "rollout/response_len_mean": sum(len(s.response_tokens) for s in samples) / n,
        "rollout/truncated_frac": sum(s.status == SampleStatus.TRUNCATED for s in samples) / n,
        "rollout/sample_version_min": float(min(s.policy_version for s in samples)),
        "rollout/sample_version_max": float(max(s.policy_version for s in samples)),
    }


def multi_version_frac(samples: list[Sample]) -> float:
    """Share of the samples whose generation spanned a weight update (more than one weight version)."""
    return sum(len(s.metadata.get("weight_versions") or ()) > 1 for s in samples) / len(samples)


def collect_rollout(router: EngineRouter, run: Callable, dataset: PromptDataset, cfg: RolloutConfig,
                    rollout_batch_size: int, reward_fn: RewardFn, *,
                    max_attempts: int = 4) -> tuple[list[Sample], dict]:
    """Generate, score and filter until ``rollout_batch_size`` samples in whole groups are ready.

    Args:
        router: the engines' router; ``run`` executes a coroutine on its event loop.
        dataset: prompt source (advanced by the prompts consumed, for resume).
        cfg: rollout config (sampling, n_samples_per_prompt).
        rollout_batch_size: samples wanted (a multiple of n_samples_per_prompt).
        reward_fn: ``fn(sample, label) -> float``.
    Returns:
        (samples, metrics).
    """
    n = cfg.n_samples_per_prompt
    groups_needed = rollout_batch_size // n
    kept: list[Sample] = []
    generated = dropped = nonfinite = 0
    t0 = time.perf_counter()
    next_group = 0
    for _ in range(max_attempts):
        missing = groups_needed - len(kept) // n
        if missing == 0:
            break
        prompts = dataset.next_batch(missing)
        samples = run(_generate(router, prompts, cfg, next_group))
        next_group += len(prompts)
        generated += len(samples)
        nonfinite += score_samples(samples, reward_fn, [s.metadata["label"] for s in samples])  # NaN: flagged
        usable = drop_unusable_groups(samples)
        dropped += len(samples) - len(usable)
        kept.extend(usable)
    if len(kept) < rollout_batch_size:
        raise RolloutShortfallError(
            f"only {len(kept)} of {rollout_batch_size} samples usable after {max_attempts} rounds "
            f"({dropped} dropped as flagged/aborted); check the engine logs")
    kept = kept[:rollout_batch_size]
    elapsed = time.perf_counter() - t0
    resp_tokens = sum(len(s.response_tokens) for s in kept)
    metrics = {
        **sample_metrics(kept),
        "rollout/samples_generated": float(generated),
        "rollout/samples_dropped": float(dropped),
        "rollout/reward_nonfinite": float(nonfinite),
        "time/rollout_s": elapsed,
        "rollout/tokens_per_s": resp_tokens / max(elapsed, 1e-9),
    }
    return kept, metrics
