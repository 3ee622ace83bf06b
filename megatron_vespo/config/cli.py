"""``megatron-vespo config``: validate and print a job config."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``config`` subcommand."""
    p = subparsers.add_parser("config", help="validate a job YAML (with overrides) and print the result")
    p.add_argument("config", nargs="?", default=None, help="job YAML (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.lr=1e-6 (repeatable)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron_vespo.config.base import dump_config, load_config
    from megatron_vespo.config.job import JobConfig

    cfg = load_config(JobConfig, args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    logger.info("config OK (staleness N = %d)", cfg.train.staleness)
    return 0
