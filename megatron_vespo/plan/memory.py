"""Bytes per GPU of one training rank, term by term, and the verdict for each GPU size.

Terms (for the rank with the largest total; all ranks of a layout are listed by ``report``):

* weights: the shard's parameters in ``model.params_dtype`` (counted on the built shard);
* gradients: Megatron DDP's buffers, fp32 (``train/optim.py`` sets ``grad_reduce_in_fp32=True``);
* optimizer: Adam, per parameter 4 (fp32 main weights, only for 16-bit params) + 4 + 4 (moments);
  with the precision-aware optimizer the main weights are the 16-bit remainders (2 bytes,
  megatron-core ``store_param_remainders``). The distributed optimizer shards dense states over
  the data-parallel group and expert states over the *expert* data-parallel group (world /
  (ETP x EP x PP): 1 for TP4/EP8 on 8 GPUs, so expert states are not sharded there). CPU offload
  moves ``optimizer_offload_fraction`` of the states to host RAM;
* activations of the micro-batches in flight (``plan.activations``, TE spec on GPU), the
  transient logits of the log-prob computation, the micro-batch tensors;
* routing replay: R2 records stay on the device until the old-log-prob pass ends (int64
  [rows, S / TP, K] per MoE layer); R3 / R2 replay targets per micro-batch (x2 with recompute);
* host RAM: the rollout batch each rank receives (``orchestration/batch_transfer.py``: per-token
  fields of all rows, compact routes of its own data-parallel rows), the offloaded optimizer states.

Usable memory is ``gpu_mem x gpu_mem_reserve`` (CUDA context, NCCL buffers, allocator
fragmentation take the rest; 0.9 by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_vespo.plan.activations import ActivationInputs, micro_batch_activation_bytes
from megatron_vespo.plan.layout import ClusterOptions, GiB, MemoryOptions, World

GPU_SIZES_GIB = (24, 40, 48, 80, 94, 141, 192)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class RankMemory:
    """Per-GPU bytes of one rank, by term, plus what its optimizer would take under other options."""

    rank: int
    terms: dict[str, float]
    host_bytes: float  # host RAM per rank (batch transfer + offloaded optimizer states)
    optimizer_options: dict[str, float] = field(default_factory=dict)
    seq_len: int = 0
    micro_in_flight: int = 1

    @property
    def total(self) -> float:
        """Sum of the GPU terms."""
        return sum(self.terms.values())

    @property
    def largest(self) -> str:
        """Name of the largest GPU term."""
        return max(self.terms, key=self.terms.get)


def seq_len(job: Any) -> int:
    """Longest training sequence: ``data.max_prompt_len + rollout.sampling.max_new_tokens``, padded to TP."""
    tp = job.parallel.tensor_model_parallel_size
    s = job.data.max_prompt_len + job.rollout.sampling.max_new_tokens
    return -(-s // tp) * tp


def optimizer_split(shard: Any, job: Any, world: World, mem: MemoryOptions, *, distributed: Optional[bool] = None,
                    precision_aware: Optional[bool] = None) -> float:
    """GPU bytes of this shard's Adam states (before offload).

    8 bytes per parameter (two fp32 moments) plus fp32 main weights for the 16-bit parameters
    (4 bytes; 2 with the precision-aware optimizer's 16-bit remainders); parameters that are
    fp32 already (the local spec's norms) are their own main weights. Dense states are sharded
    over DP, expert states over the expert DP group, when the distributed optimizer is on.
    """
    dist = job.parallel.use_distributed_optimizer if distributed is None else distributed
    pa = mem.use_precision_aware_optimizer if precision_aware is None else precision_aware
    main = 2 if pa else 4
    dense = 8 * shard.dense_params + main * (shard.half_params - shard.half_expert_params)
    expert = 8 * shard.expert_params + main * shard.half_expert_params
    # megatron shards only when DP > 1 (train/optim.py: the distributed optimizer needs dp_size > 1)
    dp, edp = (world.dp, world.expert_dp) if dist else (1, 1)
    return dense / dp + expert / edp


def rank_memory(shard: Any, job: Any, hf_cfg: Any, world: World, mem: MemoryOptions, *,
                spec: str = "te") -> RankMemory:
    """Bytes per GPU for the rank(s) of ``shard`` (a :class:`megatron_vespo.plan.shards.Shard`)."""
    par, train = job.parallel, job.train
    nbytes = _DTYPE_BYTES[job.model.params_dtype]
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    s, b = seq_len(job), train.micro_batch_size
    last = shard.pp == pp - 1
    dims = ActivationInputs.from_hf(hf_cfg, layers=shard.layers, last_stage=last)
    act = micro_batch_activation_bytes(
        dims, micro=b, seq=s, tp=tp, nbytes=nbytes, spec=spec, recompute=mem.recompute_granularity,
        recompute_method=mem.recompute_method, recompute_num_layers=mem.recompute_num_layers)
    n_micro = train.mini_batch_size // max(1, b * world.dp)
    in_flight = min(pp - shard.pp, n_micro) if pp > 1 else 1  # 1F1B: stage p holds pp - p micro-batches
    opt = optimizer_split(shard, job, world, mem)
    offload = mem.optimizer_offload_fraction if mem.optimizer_cpu_offload else 0.0
    moe_here = dims.moe_layers
    k = int(getattr(hf_cfg, "num_experts_per_tok", 0) or 0)
    replay = 0.0
    if job.routing.mode != "disabled" and moe_here:
        target = moe_here * (b * s / tp) * k * 8 * (2 if mem.recompute_granularity else 1)
        replay = target
        if job.routing.mode == "R2":  # records of every row this DP rank sees, until collected
            replay += moe_here * (train.rollout_batch_size / world.dp) * (s / tp) * k * 8
    vocab_local = hf_cfg.vocab_size / tp
    logits = b * s * vocab_local * (nbytes + (4 if nbytes != 4 else 0)) if last else 0.0
    micro_tensors = b * s * (8 + 8 + 4 + 4 + 4) + (b * s * dims.moe_layers * k * 8 if job.routing.mode == "R3" else 0)
    terms = {
        "weights": float(shard.param_bytes),
        "gradients (fp32)": 4.0 * shard.params,
        "optimizer": opt * (1 - offload),
        "activations": (act["total"] - act["recompute_peak"]) * in_flight + act["recompute_peak"],
        "logits (transient)": logits,
        "routing replay": replay,
        "micro-batch tensors": float(micro_tensors),
    }
    # host RAM per rank: the received batch, and with CPU offload the offloaded optimizer states plus
    # their share of fp32 gradients copied for the CPU Adam step (HybridDeviceOptimizer)
    host = batch_transfer_bytes(job, hf_cfg, world.dp) + offload * (opt + 4.0 * shard.params)
    options = {
        "no distributed optimizer": optimizer_split(shard, job, world, mem, distributed=False, precision_aware=False),
        "distributed optimizer": optimizer_split(shard, job, world, mem, distributed=True, precision_aware=False),
    }
    if nbytes == 2:
        options["distributed + precision-aware"] = optimizer_split(shard, job, world, mem, distributed=True,
                                                                   precision_aware=True)
    return RankMemory(rank=shard.rank, terms=terms, host_bytes=host, optimizer_options=options, seq_len=s,
                      micro_in_flight=in_flight)


def batch_transfer_bytes(job: Any, hf_cfg: Any, dp: int) -> float:
    """Bytes of one rollout batch that reach each training rank (``orchestration/batch_transfer.py``).

    Every rank gets the per-token fields of all rows (tokens, loss mask, rollout log-probs: 16 B
    per token) and the per-row fields; R3 routes travel in their compact type (``routing/compact.py``:
    1 byte per id below 255 experts, 2 below 32768) and only for this rank's data-parallel rows.
    """
    from megatron_vespo.models.qwen3_moe import num_moe_layers

    rows, s = job.train.rollout_batch_size, seq_len(job)
    total = rows * (s * 16 + 8 + 4 + 8 + 8)  # + lengths, advantages, group ids, versions
    if job.routing.mode == "R3":
        n_exp = int(getattr(hf_cfg, "num_experts", 0) or 0)
        width = 1 if n_exp < 255 else 2 if n_exp < 2**15 else 4
        total += rows / dp * s * num_moe_layers(hf_cfg) * int(hf_cfg.num_experts_per_tok) * width
    return float(total)


def suggestion(rm: RankMemory, job: Any, world: World, mem: MemoryOptions) -> str:
    """What to change to shrink the largest term (names the config field or flag)."""
    term = rm.largest
    if term == "optimizer":
        if not job.parallel.use_distributed_optimizer:
            return "set parallel.use_distributed_optimizer=true"
        tips = []
        if world.expert_dp == 1:
            tips.append("add nodes (--nodes) so the expert data-parallel size exceeds 1 and shards expert states")
        if not mem.optimizer_cpu_offload:
            tips.append("set train.optimizer_cpu_offload=true (train.optimizer_offload_fraction)")
        if not mem.use_precision_aware_optimizer and job.model.params_dtype != "float32":
            tips.append("set train.use_precision_aware_optimizer=true")
        return "; or ".join(tips) or "raise parallel.expert_model_parallel_size"
    if term in ("activations", "logits (transient)"):
        if mem.recompute_granularity != "full":
            return ("set model.recompute_granularity=full, model.recompute_method=uniform, "
                    "model.recompute_num_layers=1")
        if job.train.micro_batch_size > 1:
            return "lower train.micro_batch_size"
        return ("raise parallel.tensor_model_parallel_size (or context_parallel_size), or shorten "
                "data.max_prompt_len + rollout.sampling.max_new_tokens")
    if term == "routing replay":
        return "lower train.rollout_batch_size or raise parallel.tensor_model_parallel_size"
    return "raise parallel.expert_model_parallel_size or parallel.pipeline_model_parallel_size"


def verdicts(rm: RankMemory, job: Any, world: World, mem: MemoryOptions, cluster: ClusterOptions) -> list[dict]:
    """Fit / no fit for each common GPU size and for ``cluster.gpu_mem``."""
    sizes = sorted({*(g * GiB for g in GPU_SIZES_GIB), cluster.gpu_mem})
    out = []
    for size in sizes:
        usable = size * cluster.gpu_mem_reserve
        fits = rm.total <= usable
        out.append({"gpu_mem_gib": size / GiB, "usable_gib": usable / GiB, "need_gib": rm.total / GiB,
                    "fits": fits, "largest": rm.largest, "change": "" if fits else suggestion(rm, job, world, mem),
                    "planned": size == cluster.gpu_mem})
    return out
