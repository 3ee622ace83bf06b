"""``megatron-vespo config``: validate and print a job config, or ``--explain`` its fields."""

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
    p.add_argument("--explain", nargs="?", const="", default=None, metavar="SECTION",
                   help="print every field (dotted name, type, default, doc) of SECTION (e.g. train) or of all "
                        "sections, then exit")
    p.set_defaults(func=_run)


def explain(section: str = "") -> str:
    """The ``--explain`` text: one block per field of ``section`` ('' = every section)."""
    from megatron_vespo.config.base import ConfigError, explain_fields
    from megatron_vespo.config.job import JobConfig

    rows = explain_fields(JobConfig)
    if section:
        rows = [r for r in rows if r[0] == section or r[0].startswith(section + ".")]
        if not rows:
            raise ConfigError(f"config --explain: unknown section '{section}'; sections: "
                              f"{', '.join(JobConfig.model_fields)}")
    return "".join(f"{name}: {typ} = {default}\n    {doc}\n" for name, typ, default, doc in rows)


def _run(args: argparse.Namespace) -> int:
    from megatron_vespo.config.base import dump_config, load_config
    from megatron_vespo.config.job import JobConfig

    if args.explain is not None:
        sys.stdout.write(explain(args.explain))
        return 0
    cfg = load_config(JobConfig, args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    logger.info("config OK (staleness N = %d)", cfg.train.staleness)
    return 0
