"""``megatron-vespo train``: run the RL loop of a job YAML (under torchrun or as one process)."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_vespo.config.job import JobConfig

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser(
        "train", help="run the RL loop (rollout -> train N updates -> weight sync) of a job YAML",
        description="Every training rank runs this command: `torchrun --nproc-per-node N -m megatron_vespo.cli "
                    "train JOB.yaml` (or plainly, as one process). Rank 0 drives the rollout engines.")
    p.add_argument("config", help="job YAML, e.g. examples/configs/tiny_cpu_vespo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.lr=1e-6 (repeatable)")
    p.set_defaults(func=_run)


def _has_module(name: str) -> bool:
    """Whether ``name`` is importable, without importing it (SGLang takes seconds to import)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _preflight(job: "JobConfig") -> None:
    """Fail before any Megatron work on what is cheap to check: the prompt file, optional packages the job needs."""
    from pathlib import Path

    from megatron_vespo.config.base import ConfigError

    if job.data.source == "jsonl" and job.data.path and not Path(job.data.path).is_file():
        raise ConfigError(f"data.path {job.data.path}: no such file")

    if job.data.reward == "math" and not _has_module("math_verify"):
        from megatron_vespo.utils.imports import INSTALL_HINTS

        raise ConfigError(f"data.reward=math scores answers with math-verify, which is not installed: "
                          f"{INSTALL_HINTS['math_verify']}")
    if job.rollout.engine != "sglang" or job.rollout.urls:
        return
    if not _has_module("sglang"):
        raise ConfigError("rollout.engine=sglang launches `python -m sglang.launch_server` with this Python, which "
                          "has no sglang: pip install 'megatron_vespo[sglang]' (GPU), or point rollout.urls at "
                          "running servers, or use rollout.engine=embedded (CPU)")


def _run(args: argparse.Namespace) -> int:
    from megatron_vespo.config.base import load_config
    from megatron_vespo.config.job import JobConfig

    job = load_config(JobConfig, args.config, args.overrides)
    _preflight(job)
    from megatron_vespo.orchestration.threads import apply_trainer_threads

    apply_trainer_threads(job)  # train.torch_threads / the async split of the cores
    if job.loop.mode == "async":
        from megatron_vespo.orchestration.async_loop import run_async as run
    else:
        from megatron_vespo.orchestration.sync_loop import run_sync as run

    history = run(job)
    if history and "rollout/reward_mean" in history[-1]:  # rank 0 only: other ranks hold no rollout metrics
        logger.info("done: %d rollouts, final reward %.3f; metrics in %s/metrics.jsonl", len(history),
                    history[-1].get("rollout/reward_mean", float("nan")), job.loop.output_dir)
    return 0
