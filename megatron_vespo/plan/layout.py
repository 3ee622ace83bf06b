"""What a plan is about: the cluster, the world size, the memory options, and the layout checks.

Every check here runs before anything is built and answers with the field to change
(``parallel.expert_model_parallel_size=6 does not divide num_experts=128``). All problems are
collected and reported together, so one plan run lists everything that would stop the job.

Memory options are read with ``getattr`` defaults (``model.recompute_granularity``,
``train.optimizer_cpu_offload`` ...), falling back to ``model.transformer_overrides`` for the
recompute fields (Megatron names), so the planner works whether or not the config sections
define them yet.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from megatron_vespo.config.base import ConfigError

GiB = 2**30
_UNITS = {"": GiB, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": GiB,
          "gb": 1e9, "gib": GiB, "t": 2**40, "tb": 1e12, "tib": 2**40}


class PlanError(ConfigError):
    """The job cannot run as configured; the message lists each problem with the field to change."""


def parse_size(text: str | float | int, what: str = "size") -> int:
    """``"80GiB"`` / ``"80GB"`` / ``"141G"`` / ``80`` (GiB) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text * GiB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what} '{text}' is not a size (e.g. 80GiB, 80GB, 141G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class ClusterOptions:
    """The hardware a plan is for (``--gpus-per-node``, ``--gpu-mem``, ``--nodes``, ...)."""

    gpus_per_node: int = 8
    gpu_mem: int = 80 * GiB
    nodes: Optional[int] = None
    host_mem: Optional[int] = None  # host RAM per node; only reported when None
    link_gbps: float = 400.0  # trainer -> engine link for the weight-sync time (Gbit/s)
    gpu_mem_reserve: float = 0.9  # usable fraction (CUDA context, allocator fragmentation, NCCL buffers)


@dataclass(frozen=True)
class MemoryOptions:
    """The job's memory-saving options (read from the config with defaults)."""

    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 1.0
    use_precision_aware_optimizer: bool = False

    @classmethod
    def from_job(cls, job: Any) -> "MemoryOptions":
        """Read the options from ``job.model`` / ``job.train`` (``transformer_overrides`` as fallback)."""
        over = dict(getattr(job.model, "transformer_overrides", {}) or {})

        def model_opt(name: str) -> Any:
            value = getattr(job.model, name, None)
            return over.get(name) if value is None else value

        return cls(
            recompute_granularity=model_opt("recompute_granularity"),
            recompute_method=model_opt("recompute_method"),
            recompute_num_layers=model_opt("recompute_num_layers"),
            optimizer_cpu_offload=bool(getattr(job.train, "optimizer_cpu_offload", False)),
            optimizer_offload_fraction=float(getattr(job.train, "optimizer_offload_fraction", 1.0)),
            use_precision_aware_optimizer=bool(getattr(job.train, "use_precision_aware_optimizer", False)),
        )


@dataclass(frozen=True)
class World:
    """World size and the derived data-parallel sizes."""

    size: int
    nodes: int
    gpus_per_node: int
    dp: int  # data-parallel size of the dense (attention) weights
    expert_dp: int  # data-parallel size of the expert weights (shards expert optimizer states)

    @property
    def single_node(self) -> bool:
        """True when the whole training job fits one node."""
        return self.nodes == 1


def min_world_size(parallel: Any) -> int:
    """Smallest world size the layout admits: lcm(TP x PP x CP, ETP x EP x PP)."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    return math.lcm(tp * pp * parallel.context_parallel_size, etp * parallel.expert_model_parallel_size * pp)


def resolve_world(parallel: Any, cluster: ClusterOptions) -> World:
    """World size = ``nodes x gpus_per_node`` when ``--nodes`` is given, else the smallest the layout admits
    (rounded up to whole nodes when it spans more than one)."""
    need = min_world_size(parallel)
    if cluster.nodes is not None:
        size = cluster.nodes * cluster.gpus_per_node
    elif need <= cluster.gpus_per_node:
        size = need
    else:
        size = math.ceil(need / cluster.gpus_per_node) * cluster.gpus_per_node
    nodes = cluster.nodes or max(1, math.ceil(size / cluster.gpus_per_node))
    tp, pp, cp = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                  parallel.context_parallel_size)
    etp = parallel.expert_tensor_parallel_size or tp
    return World(size=size, nodes=nodes, gpus_per_node=cluster.gpus_per_node,
                 dp=max(1, size // (tp * pp * cp)),
                 expert_dp=max(1, size // (etp * parallel.expert_model_parallel_size * pp)))


def _kv_heads_ok_for_engine(kv_heads: int, tp: int) -> bool:
    # SGLang shards KV heads over its TP ranks and replicates them when TP > kv_heads
    # (python/sglang/srt/layers/linear.py QKVParallelLinear): either must divide the other.
    return kv_heads % tp == 0 or tp % kv_heads == 0


def layout_problems(job: Any, hf_cfg: Any, world: World) -> list[str]:
    """Every reason the job cannot run on ``world``, each naming the field to change (empty = fine)."""
    par, train, out = job.parallel, job.train, []
    tp, pp, ep = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size)
    etp, cp = par.expert_tensor_parallel_size or tp, par.context_parallel_size
    heads, kv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    n_exp = int(getattr(hf_cfg, "num_experts", 0) or 0)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            out.append(msg)

    need(heads % tp == 0, f"parallel.tensor_model_parallel_size={tp} does not divide num_attention_heads={heads}")
    need(kv % tp == 0, f"parallel.tensor_model_parallel_size={tp} does not divide num_key_value_heads={kv} "
                       "(Megatron splits whole KV groups over TP; use a TP that divides it)")
    need(hf_cfg.num_hidden_layers % pp == 0, f"parallel.pipeline_model_parallel_size={pp} does not divide "
                                              f"num_hidden_layers={hf_cfg.num_hidden_layers}")
    if n_exp:
        need(n_exp % ep == 0, f"parallel.expert_model_parallel_size={ep} does not divide num_experts={n_exp}")
        need(hf_cfg.moe_intermediate_size % etp == 0, f"parallel.expert_tensor_parallel_size={etp} does not divide "
                                                       f"moe_intermediate_size={hf_cfg.moe_intermediate_size}")
        need(not (tp > 1 and not par.sequence_parallel),
             "parallel.sequence_parallel must be true when tensor_model_parallel_size > 1 with MoE layers")
    need(hf_cfg.intermediate_size % tp == 0, f"parallel.tensor_model_parallel_size={tp} does not divide "
                                             f"intermediate_size={hf_cfg.intermediate_size}")
    need(world.size % (tp * pp * cp) == 0, f"world size {world.size} (--nodes x --gpus-per-node) is not a multiple "
                                           f"of parallel.tensor_model_parallel_size x pipeline_model_parallel_size x "
                                           f"context_parallel_size = {tp * pp * cp}")
    need(world.size % (etp * ep * pp) == 0, f"world size {world.size} is not a multiple of "
                                            f"parallel.expert_tensor_parallel_size x expert_model_parallel_size x "
                                            f"pipeline_model_parallel_size = {etp * ep * pp}")
    dp = world.dp
    need(train.mini_batch_size % (train.micro_batch_size * dp) == 0,
         f"train.mini_batch_size={train.mini_batch_size} must be a multiple of train.micro_batch_size x "
         f"data-parallel size = {train.micro_batch_size} x {dp} (each DP rank cuts its slice into micro-batches)")
    need(train.rollout_batch_size % train.mini_batch_size == 0,
         f"train.rollout_batch_size={train.rollout_batch_size} must be a multiple of train.mini_batch_size")
    if job.rollout.engine == "sglang":
        rtp = job.rollout.tp_size
        need(heads % rtp == 0, f"rollout.tp_size={rtp} does not divide num_attention_heads={heads}")
        need(_kv_heads_ok_for_engine(kv, rtp), f"rollout.tp_size={rtp} and num_key_value_heads={kv}: one must divide "
                                               "the other (SGLang shards or replicates KV heads)")
        if job.weight_sync.kind == "tensor":
            need(world.size % rtp == 0, f"weight_sync.kind=tensor puts one engine on every rollout.tp_size={rtp} "
                                        f"training GPUs: world size {world.size} must be a multiple of it")
    mem = MemoryOptions.from_job(job)
    need(mem.recompute_granularity in (None, "full", "selective"),
         f"model.recompute_granularity={mem.recompute_granularity!r} must be null, 'full' or 'selective'")
    if mem.recompute_granularity == "full":
        need(mem.recompute_method in ("uniform", "block"),
             "model.recompute_method must be 'uniform' or 'block' with model.recompute_granularity=full")
        n = mem.recompute_num_layers
        need(n is not None and 1 <= n <= hf_cfg.num_hidden_layers // pp,
             f"model.recompute_num_layers={n} must be between 1 and the layers per pipeline stage "
             f"({hf_cfg.num_hidden_layers // pp}) with model.recompute_granularity=full")
    need(0.0 <= mem.optimizer_offload_fraction <= 1.0,
         f"train.optimizer_offload_fraction={mem.optimizer_offload_fraction} must be in [0, 1]")
    if mem.use_precision_aware_optimizer or mem.optimizer_cpu_offload:
        need(par.use_distributed_optimizer, "train.use_precision_aware_optimizer / train.optimizer_cpu_offload need "
                                            "parallel.use_distributed_optimizer=true (Megatron asserts it)")
    return out


def check_layout(job: Any, hf_cfg: Any, world: World) -> None:
    """Raise :class:`PlanError` listing every layout problem (see :func:`layout_problems`)."""
    problems = layout_problems(job, hf_cfg, world)
    if problems:
        raise PlanError("this job cannot run as configured:\n" + "\n".join(f"  - {p}" for p in problems))
