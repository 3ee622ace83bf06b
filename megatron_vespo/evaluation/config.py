"""Config of held-out evaluation (owned by ``evaluation/``)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from megatron_vespo.config.base import Section


class EvalConfig(Section):
    """What ``megatron-vespo eval`` and the loop's periodic evaluation score.

    Math releases (AIME, AMC, MATH-500) ship ``problem`` / ``answer`` fields, the defaults of
    ``prompt_key`` / ``label_key``; token-id prompts work as in ``data``.

    Scores: ``avg@k`` = mean reward over ``k`` samples per prompt at ``temperature``; ``pass@k`` =
    fraction of prompts with at least one sample whose reward >= ``pass_threshold``; ``greedy`` =
    mean reward of one greedy response per prompt (when ``greedy``). During training
    (``loop.eval_every`` > 0) the best policy is an HF directory ``eval`` can score.
    """

    path: Optional[str] = None
    """JSONL held-out set (math releases ship problem/answer fields); None = a held-out synthetic split (seed data.seed
    + 7919)."""
    prompt_key: str = "problem"
    """JSONL field holding the prompt (text or token ids)."""
    label_key: str = "answer"
    """JSONL field holding the reference answer."""
    num_prompts: Optional[int] = Field(None, ge=1)
    """Prompts evaluated (default: the whole file; required size of the synthetic split)."""
    reward: Optional[str] = None
    """Reward function name in rewards/ (default: data.reward)."""
    k: int = Field(4, ge=1)
    """Samples per prompt for avg@k and pass@k."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the k samples."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold of the k samples."""
    greedy: bool = True
    """Also score one greedy response per prompt (the greedy metric)."""
    max_new_tokens: Optional[int] = Field(None, ge=1)
    """Response length cap (default: rollout.sampling.max_new_tokens)."""
    pass_threshold: float = 1.0
    """A sample passes (pass@k) when its reward is >= this."""
    seed: int = 0
    """Base sampling seed of the evaluation requests."""
    keep_best: bool = True
    """During training, export the policy with the best avg@k so far to <loop.output_dir>/best_policy."""
