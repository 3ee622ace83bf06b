"""``megatron-vespo plan JOB.yaml``: the full-scale dry run (see ``plan.report`` and docs/planning.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` subcommand."""
    p = subparsers.add_parser(
        "plan", help="dry-run a job at full size on CPU: shards, parameters, memory per GPU, conversion, weight sync",
        description="Builds every distinct rank's model shard on the meta device under a fake process group, checks "
                    "the layout, the HF conversion and the memory per GPU; exits 2 with the field to change when "
                    "the job could not run. No GPU needed.")
    p.add_argument("config", help="job YAML, e.g. examples/configs/qwen3_30b_a3b_vespo_ep8.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, as for `train` (repeatable), e.g. --set model.hf_path=/ckpt/Qwen3-30B-A3B")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-mem", default="80GiB", help="memory per GPU to plan for, e.g. 80GiB, 141GB (default 80GiB)")
    p.add_argument("--nodes", type=int, default=None,
                   help="training nodes (default: the fewest the layout admits); world = nodes x gpus-per-node")
    p.add_argument("--host-mem", default=None, help="host RAM per node to check against, e.g. 2TiB (default: report)")
    p.add_argument("--link-gbps", type=float, default=400.0,
                   help="trainer -> engine bandwidth for the weight-sync time, Gbit/s (default 400)")
    p.add_argument("--gpu-mem-reserve", type=float, default=0.9,
                   help="usable fraction of GPU memory (CUDA context, NCCL, fragmentation; default 0.9)")
    p.add_argument("--spec", choices=["te", "local"], default="te",
                   help="activation formula: te = Transformer Engine layers (GPU runs), local = megatron-core local "
                        "layers (what runs on CPU)")
    p.add_argument("--json", dest="json_out", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the plan as JSON to PATH (or stdout with no PATH) instead of the table")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron_vespo.config.base import ConfigError, load_config
    from megatron_vespo.config.job import JobConfig
    from megatron_vespo.plan.layout import ClusterOptions, parse_size
    from megatron_vespo.plan.report import check_plan, render, run_plan, write_json

    if args.gpus_per_node < 1 or (args.nodes is not None and args.nodes < 1):
        raise ConfigError("--gpus-per-node and --nodes must be >= 1")
    if not 0 < args.gpu_mem_reserve <= 1:
        raise ConfigError("--gpu-mem-reserve must be in (0, 1]")
    cluster = ClusterOptions(gpus_per_node=args.gpus_per_node, gpu_mem=parse_size(args.gpu_mem, "--gpu-mem"),
                             nodes=args.nodes, link_gbps=args.link_gbps, gpu_mem_reserve=args.gpu_mem_reserve,
                             host_mem=parse_size(args.host_mem, "--host-mem") if args.host_mem else None)
    job = load_config(JobConfig, args.config, args.overrides)
    plan = run_plan(job, cluster, spec=args.spec, source=str(args.config))
    if args.json_out == "-":
        sys.stdout.write(json.dumps(plan, indent=2, sort_keys=True, default=str) + "\n")
    elif args.json_out:
        write_json(plan, args.json_out)
        logger.info("plan written to %s", args.json_out)
    if args.json_out != "-":
        sys.stdout.write(render(plan) + "\n")
    check_plan(plan)
    return 0
