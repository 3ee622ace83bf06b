"""``megatron-vespo serve`` (embedded CPU rollout server) and ``megatron-vespo tiny-checkpoint``."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` and ``tiny-checkpoint`` subcommands."""
    from megatron_vespo.rollout.embedded.server import add_serve_args  # light: no torch model import

    p = subparsers.add_parser("serve", help="run the embedded CPU rollout server (SGLang HTTP protocol)")
    add_serve_args(p)
    p.set_defaults(func=_serve)

    t = subparsers.add_parser("tiny-checkpoint", help="write a random-weight HF checkpoint of a models.presets "
                                                      "architecture (for tests and the quickstart)")
    t.add_argument("out_dir", help="directory to create (must not exist or be empty)")
    t.add_argument("--preset", default="tiny")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_tiny)


def _serve(args: argparse.Namespace) -> int:
    from megatron_vespo.rollout.embedded.server import serve

    return serve(args)


def _tiny(args: argparse.Namespace) -> int:
    from megatron_vespo.rollout.embedded.models import save_tiny_checkpoint

    path = save_tiny_checkpoint(args.out_dir, preset=args.preset, seed=args.seed)
    logger.info("tiny checkpoint written to %s", path)
    return 0
