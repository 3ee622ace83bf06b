"""``megatron-vespo eval``: score a policy (HF directory or training checkpoint) on the held-out set."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    p = subparsers.add_parser(
        "eval", help="score a policy on the job's held-out set (avg@k, pass@k, greedy) through the rollout engines",
        description="The policy is an HF directory, a converted model checkpoint or a training checkpoint "
                    "(save dir or iter_* dir; converted to HF in a temporary directory first). The job YAML "
                    "supplies the engines (rollout.*), the reward (eval.reward or data.reward) and the "
                    "held-out set (eval.*).")
    p.add_argument("config", help="job YAML, e.g. examples/configs/tiny_cpu_vespo.yaml")
    p.add_argument("--policy", default=None, help="policy to score (default: model.hf_path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set eval.k=8 (repeatable)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the metrics to this JSON file")
    p.set_defaults(func=_run)


def hf_policy_dir(policy: str, workdir: Path) -> str:
    """An HF directory holding ``policy``: itself, or a conversion of a Megatron checkpoint into ``workdir``."""
    from megatron_vespo.checkpoint.checkpointer import classify_checkpoint

    kind = classify_checkpoint(policy)
    if kind == "hf":
        return policy
    from megatron_vespo.checkpoint.cli import run_conversion
    from megatron_vespo.checkpoint.dist import launch_local

    out = workdir / "policy_hf"
    logger.info("converting %s checkpoint %s to HF in %s", kind, policy, out)
    launch_local(run_conversion, 1, "mcore-to-hf", dict(ckpt_dir=policy, out_dir=str(out)))
    return str(out)


def run_eval(job: Any, policy_dir: str, log_dir: str) -> dict[str, float]:
    """Start the job's engines on ``policy_dir``, evaluate the held-out set, stop them; returns the metrics."""
    from transformers import AutoConfig

    from megatron_vespo.evaluation.core import evaluate, load_eval_prompts
    from megatron_vespo.orchestration.engines import RolloutEngines
    from megatron_vespo.orchestration.setup import load_tokenizer
    from megatron_vespo.rewards import get_reward

    vocab = AutoConfig.from_pretrained(policy_dir).vocab_size
    tok = load_tokenizer(policy_dir) or load_tokenizer(job.model.hf_path)
    prompts = load_eval_prompts(job.eval, job.data, vocab, None if tok is None else tok.encode)
    reward_fn = get_reward(job.eval.reward or job.data.reward)
    max_new = job.eval.max_new_tokens or job.rollout.sampling.max_new_tokens
    with RolloutEngines(job.rollout, policy_dir, log_dir=log_dir).start() as engines:
        return engines.run(evaluate(engines.router, prompts, reward_fn, job.eval, max_new))


def _run(args: argparse.Namespace) -> int:
    from megatron_vespo.config.base import ConfigError, load_config
    from megatron_vespo.config.job import JobConfig
    from megatron_vespo.utils.io import atomic_path

    job = load_config(JobConfig, args.config, args.overrides)
    policy = args.policy or job.model.hf_path
    if policy is None:
        raise ConfigError("nothing to evaluate: pass --policy DIR (HF directory or checkpoint) or set model.hf_path")
    with tempfile.TemporaryDirectory(prefix="mv_eval_") as tmp:
        metrics = run_eval(job, hf_policy_dir(policy, Path(tmp)), log_dir=tmp)
    width = max(len(k) for k in metrics)
    logger.info("held-out evaluation of %s:\n%s", policy,
                "\n".join(f"  {k:<{width}}  {v:.4f}" for k, v in metrics.items()))
    if args.json_out:
        with atomic_path(args.json_out) as fh:
            json.dump({"policy": str(policy), "config": args.config, "overrides": args.overrides, **metrics}, fh,
                      indent=1)
    return 0
