"""Config of held-out evaluation (owned by ``evaluation/``)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from megatron_vespo.config.base import Section


class EvalConfig(Section):
    """What ``megatron-vespo eval`` and the loop's periodic evaluation score.

    ``path``: a JSONL held-out set. Math releases (AIME, AMC, MATH-500) ship ``problem`` /
    ``answer`` fields, the defaults of ``prompt_key`` / ``label_key``; token-id prompts work as in
    ``data``. Without ``path``, a synthetic job evaluates on a held-out synthetic split (the same
    generator as ``data`` with a different seed: ``data.seed + 7919``), ``num_prompts`` of them.

    Scores: ``avg@k`` = mean reward over ``k`` samples per prompt at ``temperature``; ``pass@k`` =
    fraction of prompts with at least one sample whose reward >= ``pass_threshold``; ``greedy`` =
    mean reward of one greedy response per prompt (when ``greedy``). ``reward`` defaults to
    ``data.reward``; ``max_new_tokens`` to ``rollout.sampling.max_new_tokens``.

    During training (``loop.eval_every`` > 0) ``keep_best`` exports the policy with the best
    ``avg@k`` so far to ``<loop.output_dir>/best_policy`` (an HF directory ``eval`` can score).
    """

    path: Optional[str] = None
    prompt_key: str = "problem"
    label_key: str = "answer"
    num_prompts: Optional[int] = Field(None, ge=1)
    reward: Optional[str] = None
    k: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    greedy: bool = True
    max_new_tokens: Optional[int] = Field(None, ge=1)
    pass_threshold: float = 1.0
    seed: int = 0
    keep_best: bool = True
