#!/usr/bin/env python
"""Benchmark every policy loss (forward + backward) against GRPO on this machine.

Thin wrapper over ``megatron_vespo.losses.bench`` (same as ``megatron-vespo bench-losses``)::

    python tools/bench_losses.py --quick
    python tools/bench_losses.py --sizes 256x1024,1024x8192 --json bench_losses.json
"""

import argparse
import logging
import sys

from megatron_vespo.losses.cli import add_bench_arguments, run_bench


def main(argv=None) -> int:
    """Parse arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
