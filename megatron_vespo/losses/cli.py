"""``megatron-vespo bench-losses``: time every policy loss against GRPO (see ``losses/bench.py``)."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the subcommand and ``tools/bench_losses.py``."""
    parser.add_argument("--quick", action="store_true", help="small sizes (16x128, 64x512) for a smoke run")
    parser.add_argument("--sizes", default=None, metavar="BxT[,BxT...]",
                        help="batch x tokens list (default 256x1024,256x8192,1024x1024,1024x8192)")
    parser.add_argument("--losses", default=None, metavar="NAME[,NAME...]", help="subset of losses (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per loss (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warmup runs per loss")
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write results as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench-losses`` subcommand."""
    p = subparsers.add_parser("bench-losses", help="forward+backward time of each policy loss relative to GRPO")
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; writes the table to stdout (and JSON if asked)."""
    import torch

    from megatron_vespo.losses.bench import FULL_SIZES, QUICK_SIZES, bench_losses, format_table, parse_sizes, to_json
    from megatron_vespo.utils.io import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sizes = parse_sizes(args.sizes) if args.sizes else list(QUICK_SIZES if args.quick else FULL_SIZES)
        names = [n.strip() for n in args.losses.split(",") if n.strip()] if args.losses else None
        results = bench_losses(names, sizes, repeats=args.repeats, warmup=args.warmup,
                               dtype=getattr(torch, args.dtype))
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write(format_table(results))
    if args.json_path:
        report = to_json(results, dtype=args.dtype, repeats=args.repeats, warmup=args.warmup)
        atomic_write_json(args.json_path, report)
        logger.info("wrote %s", args.json_path)
    return 0
