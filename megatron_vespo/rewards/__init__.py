"""Reward functions: a registry ``name -> fn(sample, label) -> float``.

- ``token_class``: fraction of response tokens whose id is congruent to the label modulo
  ``NUM_CLASSES`` (the synthetic task: base rate 1/4, so every group carries a signal).
- ``target_token``: fraction of response tokens equal to the label (a sparser variant).
- ``math``: 1.0 when the response text is mathematically equivalent to the label, verified
  by the ``math-verify`` library (HF's verifier, used rather than hand-written parsing),
  else 0.0. Needs the response text: ``metadata["response_text"]`` or the engine's ``"text"``.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from typing import Any, Callable, Optional

from megatron_vespo.types import Sample, SampleStatus

logger = logging.getLogger(__name__)

RewardFn = Callable[[Sample, Any], float]
_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function under ``name`` (duplicates are an error)."""
    def deco(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            raise ValueError(f"reward '{name}' is already registered")
        _REWARDS[name] = fn
        return fn
    return deco


def available_rewards() -> list[str]:
    """Names of the registered reward functions, sorted."""
    return sorted(_REWARDS)


def get_reward(name: str) -> RewardFn:
    """Look up a reward function; unknown names list the known ones."""
    if name not in _REWARDS:
        raise ValueError(f"unknown reward '{name}'; available: {', '.join(sorted(_REWARDS))}")
    return _REWARDS[name]


def score_samples(samples: list[Sample], reward_fn: RewardFn, labels: list[Any]) -> int:
    """Set ``s.reward = reward_fn(s, label)`` for each sample; returns how many rewards were non-finite.

    A NaN / inf reward flags its sample (``SampleStatus.FLAGGED``, reason in
    ``metadata["flag_reasons"]``, reward set to 0.0) so ``buffer.drop_unusable_groups`` drops its
    whole group, as it does for NaN log-probs: one bad score must not poison the group's
    advantages (or stop the run).
    """
    bad = 0
    for s, label in zip(samples, labels):
        r = float(reward_fn(s, label))
        if math.isfinite(r):
            s.reward = r
            continue
        bad += 1
        s.reward = 0.0
        s.status = SampleStatus.FLAGGED
        s.metadata.setdefault("flag_reasons", []).append(f"non-finite reward {r}")
    if bad:
        logger.warning("%d non-finite reward(s): their groups are dropped", bad)
    return bad


NUM_CLASSES = 4


@register_reward("token_class")
def token_class_reward(sample: Sample, label: Any) -> float:
    """Fraction of response tokens with ``token % NUM_CLASSES == label % NUM_CLASSES`` (0 if empty)."""
    if not sample.response_tokens:
        return 0.0
    c = int(label) % NUM_CLASSES
    return sum(int(t % NUM_CLASSES == c) for t in sample.response_tokens) / len(sample.response_tokens)


@register_reward("target_token")
def target_token_reward(sample: Sample, label: Any) -> float:
    """Fraction of response tokens equal to ``label`` (0 for an empty response)."""
    if not sample.response_tokens:
        return 0.0
    return sum(int(t == int(label)) for t in sample.response_tokens) / len(sample.response_tokens)


@register_reward("math")
def math_reward(sample: Sample, label: Any) -> float:
    """1.0 if the response's final answer matches ``label`` per math-verify, else 0.0."""
    text = sample.metadata.get("response_text", sample.metadata.get("text"))
    if text is None:
        raise ValueError("math reward needs the response text: sample.metadata['response_text'] or the "
                         "engine's 'text' (serve a model with a tokenizer)")
    # math-verify's timeouts use signal.alarm, which only the main thread may set: off the main
    # thread (the async loop's rollout worker, a Ray actor thread) it raises, so run without them
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    return _math_score(str(label), str(text), limit)


@functools.lru_cache(maxsize=65536)
def _math_score(label: str, text: str, limit: Optional[int]) -> float:
    """math-verify's verdict for one (label, response text) pair, memoised: the samples of a group
    often give the same answer, and the verdict depends on nothing else."""
    from megatron_vespo.utils.imports import require

    mv = require("math_verify", "the math reward")
    gold = mv.parse(label if label.startswith("$") else f"${label}$", parsing_timeout=limit)
    pred = mv.parse(text, parsing_timeout=limit)
    return float(bool(pred) and mv.verify(gold, pred, timeout_seconds=limit))


@register_reward("scratchpad")
def scratchpad_reward(sample: Sample, label: Any) -> float:
    """Fraction of the scratchpad's characters written correctly (the staleness task, ``tools/staleness_task.py``).

    ``label`` is the correct scratchpad, the comma-separated running sums (``"46,102,180"``). The
    response text is compared character by character, position-wise, over the longer of the two
    strings, so a missing or extra character costs one position and 1.0 means the whole
    scratchpad, hence the final answer, is right. Dense on purpose: the 3.35M model starts with
    the magnitudes right and most low digits wrong (about 4% exact answers after the warm-up), and
    a per-field or exact-answer reward gave most groups no learning signal in calibration
    (docs/results.md, "The staleness task").
    """
    text = sample.metadata.get("response_text", sample.metadata.get("text"))
    if text is None:
        raise ValueError("scratchpad reward needs the response text: sample.metadata['response_text'] or the "
                         "engine's 'text' (serve a model with a tokenizer)")
    want, got = str(label), str(text).strip()
    if not want and not got:
        return 1.0
    return sum(g == w for g, w in zip(got, want)) / max(len(want), len(got))
