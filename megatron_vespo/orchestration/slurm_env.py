"""What a Slurm script needs from the job YAML, as shell assignments (the YAML stays the one source).

::

    eval "$(python -m megatron_vespo.orchestration.slurm_env job.yaml --set rollout.tp_size=8)"

prints (each value shell-quoted)::

    ROLLOUT_TP=4
    NUM_ENGINES=2
    SGLANG_FLAGS=(--tp-size 4 --enable-return-routed-experts --mem-fraction-static 0.7)
    TRAIN_GPUS=8

``SGLANG_FLAGS`` is :func:`rollout.sglang_server.build_sglang_command` without the per-engine
part (model path, host, port), so a script-started engine runs with exactly the flags
``rollout.engine: sglang`` would use, ``rollout.server_args`` included. ``TRAIN_GPUS`` is the
smallest world size the parallel layout accepts. A bad YAML exits 2 with the error on stderr.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from typing import Optional, Sequence


def slurm_assignments(config: str, overrides: Sequence[str] = ()) -> list[str]:
    """Lines ``NAME=value`` (bash syntax) describing the engines and trainer of the job ``config``."""
    from megatron_vespo.config.base import load_config
    from megatron_vespo.config.job import JobConfig
    from megatron_vespo.rollout.sglang_server import build_sglang_command

    job = load_config(JobConfig, config, list(overrides))
    ro, par = job.rollout, job.parallel
    argv = build_sglang_command(ro, 0, model_path="MODEL", launcher=["LAUNCH"])
    flags = argv[argv.index("--tp-size"):]  # --model-path/--host/--port are per engine
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    etp = par.expert_tensor_parallel_size or tp
    world = math.lcm(tp * pp * cp, etp * par.expert_model_parallel_size * pp)
    return [
        f"ROLLOUT_TP={int(ro.tp_size)}",
        f"NUM_ENGINES={int(ro.num_engines)}",
        "SGLANG_FLAGS=(" + " ".join(shlex.quote(f) for f in flags) + ")",
        f"TRAIN_GPUS={world}",
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: print the assignments for a job YAML (with ``--set key=value`` overrides)."""
    parser = argparse.ArgumentParser(prog="python -m megatron_vespo.orchestration.slurm_env",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from megatron_vespo.config.base import ConfigError

    try:
        lines = slurm_assignments(args.config, args.overrides)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"{args.config}: {exc}\n")
        return 2
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
