"""``megatron-vespo plot``: PNG curves of one or more runs' metrics."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plot`` subcommand."""
    p = subparsers.add_parser("plot", help="plot reward, W, phi, ESS, KL and grad norm of runs into a PNG")
    p.add_argument("runs", nargs="+", help="run directories (loop.output_dir) or metrics.jsonl files")
    p.add_argument("--out", default="metrics.png", help="output PNG (default: metrics.png)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron_vespo.observability.plots import plot_runs

    plot_runs(args.runs, args.out)
    return 0
