"""Held-out evaluation inside the training loops: every ``loop.eval_every`` rollouts and at the end.

Rank 0 scores the engines' current weights (just synced: the policy after this iteration's
updates) on the held-out set; the metrics reach every rank, so all agree on the best one. When
``eval.keep_best`` is set and the primary metric (``eval/avg@k``) improves, every rank joins an
HF export of the actor into ``<output_dir>/best_policy`` (written next to it and swapped in, so a
kill never leaves a half-written best policy), with ``best_policy/eval.json`` saying which rollout it
is. Rows logged: ``eval/*`` plus ``eval/best`` and ``eval/best_rollout``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from megatron_vespo.evaluation.core import evaluate, load_eval_prompts, primary_metric

if TYPE_CHECKING:
    from megatron_vespo.rollout.interfaces import Engines

logger = logging.getLogger(__name__)


class LoopEvaluator:
    """Periodic held-out evaluation for a run (construct on every rank; prompts load on rank 0 only)."""

    def __init__(self, job: Any, out: Path, hf_cfg: Any, tokenize: Optional[Callable[[str], list[int]]],
                 rank0: bool, best: Optional[dict] = None) -> None:
        self.job, self.out, self.hf_cfg, self.rank0 = job, out, hf_cfg, rank0
        self.every = job.loop.eval_every
        self.key = primary_metric(job.eval)
        self.best = dict(best or {})  # {"value": float, "rollout": int}, restored on resume
        self.prompts = self.reward_fn = None
        if self.every and rank0:
            from megatron_vespo.rewards import get_reward

            self.prompts = load_eval_prompts(job.eval, job.data, hf_cfg.vocab_size, tokenize)
            self.reward_fn = get_reward(job.eval.reward or job.data.reward)
            logger.info("held-out evaluation every %d rollouts on %d prompts (%s)", self.every, len(self.prompts),
                        job.eval.path or "synthetic held-out split")

    def due(self, iteration: int) -> bool:
        """Whether ``iteration`` evaluates (every ``loop.eval_every`` and the last one)."""
        return bool(self.every) and (iteration % self.every == 0 or iteration == self.job.loop.num_rollouts)

    def state_dict(self) -> dict:
        """The best score so far (saved with checkpoints, so a resumed run keeps comparing against it)."""
        return dict(self.best)

    def maybe_evaluate(self, iteration: int, engines: Optional[Engines], model: Any) -> dict[str, float]:
        """Collective: evaluate if due; returns the ``eval/*`` metrics (empty when not due)."""
        if not self.due(iteration):
            return {}
        metrics, error = None, None
        if self.rank0:
            try:
                max_new = self.job.eval.max_new_tokens or self.job.rollout.sampling.max_new_tokens
                metrics = engines.run(evaluate(engines.router, self.prompts, self.reward_fn, self.job.eval, max_new))
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                logger.exception("held-out evaluation at rollout %d failed", iteration)
                error = f"{type(exc).__name__}: {exc}"
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            box = [metrics, error]
            torch.distributed.broadcast_object_list(box, src=0)
            metrics, error = box
        if error is not None:
            raise RuntimeError(f"held-out evaluation at rollout {iteration} failed on rank 0: {error}")
        value = metrics[self.key]
        if not self.best or value > self.best["value"]:
            self.best = {"value": value, "rollout": iteration}
            if self.job.eval.keep_best:
                self._save_best(model, iteration, metrics)
        return {**metrics, "eval/best": self.best["value"], "eval/best_rollout": float(self.best["rollout"])}

    def _save_best(self, model: Any, iteration: int, metrics: dict[str, float]) -> None:
        """Collective HF export of the actor to ``best_policy`` (written as ``best_policy.new``, then swapped)."""
        from megatron_vespo.checkpoint.hf_dir import save_hf_checkpoint

        final, new, old = (self.out / name for name in ("best_policy", "best_policy.new", "best_policy.old"))
        if self.rank0:
            shutil.rmtree(new, ignore_errors=True)  # left by a killed run
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        save_hf_checkpoint(model, self.hf_cfg, new, source_dir=self.job.model.hf_path)  # atomic itself
        if self.rank0:
            (new / "eval.json").write_text(json.dumps({"rollout": iteration, **metrics}, indent=1))
            if final.exists():
                os.replace(final, old)
            os.replace(new, final)
            shutil.rmtree(old, ignore_errors=True)
            logger.info("new best held-out %s = %.4f at rollout %d: %s", self.key, metrics[self.key], iteration, final)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
