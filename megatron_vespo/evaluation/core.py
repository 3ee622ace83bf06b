"""Score a policy on held-out prompts through the rollout engines.

Metrics (``eval/`` prefix, floats):

* ``avg@k``: mean reward over k sampled responses per prompt (the paper's avg@k);
* ``pass@k``: fraction of prompts with at least one of the k responses at reward >=
  ``pass_threshold`` (with n = k samples the unbiased estimator of Chen et al. 2021,
  1 - C(n - c, k) / C(n, k), is exactly this indicator);
* ``greedy``, ``greedy_pass``: mean reward / pass rate of one greedy response per prompt;
* ``response_len_mean``, ``num_prompts``, ``truncated_frac``.

Generation goes through ``EngineRouter.generate`` (the loop's client, engines and protocol), so
an SGLang deployment is evaluated exactly as it is trained, with per-request seeds of its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Optional

from megatron_vespo.data import Prompt
from megatron_vespo.evaluation.config import EvalConfig
from megatron_vespo.rewards import RewardFn
from megatron_vespo.rollout.config import SamplingConfig
from megatron_vespo.types import Sample

if TYPE_CHECKING:
    from megatron_vespo.rollout.interfaces import Router

logger = logging.getLogger(__name__)
HELD_OUT_SEED_OFFSET = 7919  # synthetic held-out split: data.seed + this


def load_eval_prompts(cfg: EvalConfig, data_cfg: Any, vocab_size: int,
                      tokenize: Optional[Callable[[str], list[int]]]) -> list[Prompt]:
    """The held-out prompts of ``cfg`` (JSONL file, or the synthetic held-out split of ``data_cfg``)."""
    from megatron_vespo.data.prompts import load_jsonl_prompts, synthetic_prompts

    if cfg.path is not None:
        prompts = load_jsonl_prompts(cfg.path, cfg.prompt_key, cfg.label_key, tokenize, data_cfg.max_prompt_len)
    elif data_cfg.source == "synthetic":
        prompts = synthetic_prompts(cfg.num_prompts or 64, vocab_size, min(data_cfg.max_prompt_len, 8),
                                    data_cfg.seed + HELD_OUT_SEED_OFFSET, num_targets=data_cfg.num_labels)
    else:
        raise ValueError("eval.path is not set and data.source is not synthetic: set eval.path to a held-out "
                         "JSONL file (e.g. MATH-500's test.jsonl with problem/answer fields)")
    return prompts[:cfg.num_prompts] if cfg.num_prompts else prompts


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(f"need 0 <= correct ({num_correct}) <= n ({num_samples}) and 1 <= k ({k}) <= n")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def _score(samples: list[Sample], prompts: list[Prompt], reward_fn: RewardFn) -> list[list[float]]:
    per_prompt: list[list[float]] = [[] for _ in prompts]
    for s in samples:
        p = prompts[s.group_index]
        r = float(reward_fn(s, p.label))
        if not math.isfinite(r):
            raise ValueError(f"reward of a response to held-out prompt {p.index} is {r}")
        per_prompt[s.group_index].append(r)
    return per_prompt


async def _generate(router: Router, prompts: list[Prompt], sampling: SamplingConfig, k: int, seed: int) -> list[Sample]:
    """k responses per prompt with explicit per-request seeds (``seed * 1_000_003 + i``).

    Explicit seeds, not the router's running counter: the counter advances with every rollout, so
    the same policy would be scored on different samples depending on when it is evaluated.
    """
    tasks = [router.generate(p.tokens, sampling.to_sglang(seed * 1_000_003 + g * k + j), group_index=g)
             for g, p in enumerate(prompts) for j in range(k)]
    return list(await asyncio.gather(*tasks))


async def evaluate(router: Router, prompts: list[Prompt], reward_fn: RewardFn, cfg: EvalConfig,
                   max_new_tokens: int) -> dict[str, float]:
    """Generate and score ``cfg.k`` sampled (and one greedy) responses per prompt; returns ``eval/*`` metrics."""
    if not prompts:
        raise ValueError("no held-out prompts to evaluate")
    sampled = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new_tokens)
    samples = await _generate(router, prompts, sampled, cfg.k, cfg.seed)
    rewards = _score(samples, prompts, reward_fn)
    out = {
        f"eval/avg@{cfg.k}": sum(sum(r) for r in rewards) / (cfg.k * len(prompts)),
        f"eval/pass@{cfg.k}": sum(pass_at_k(cfg.k, sum(x >= cfg.pass_threshold for x in r), cfg.k)
                                  for r in rewards) / len(prompts),
        "eval/response_len_mean": sum(len(s.response_tokens) for s in samples) / len(samples),
        "eval/truncated_frac": sum(s.status.value == "truncated" for s in samples) / len(samples),
        "eval/num_prompts": float(len(prompts)),
    }
    if cfg.greedy:
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
        g_rewards = _score(await _generate(router, prompts, greedy, 1, cfg.seed), prompts, reward_fn)
        out["eval/greedy"] = sum(r[0] for r in g_rewards) / len(prompts)
        out["eval/greedy_pass"] = sum(r[0] >= cfg.pass_threshold for r in g_rewards) / len(prompts)
    return out


def primary_metric(cfg: EvalConfig) -> str:
    """The metric that decides the best checkpoint: ``eval/avg@k``."""
    return f"eval/avg@{cfg.k}"
