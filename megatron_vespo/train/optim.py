"""Megatron DDP, optimizer and LR schedule for the actor, from ``TrainConfig``.

* ``DistributedDataParallel`` with fp32 gradient buffers; gradients are averaged over DP
  (Megatron's default), which the actor compensates for in the loss scale (``actor.py``).
* ``get_megatron_optimizer``: Adam (decoupled weight decay), separate expert / dense param
  groups, global-norm clipping at ``train.clip_grad``; the distributed optimizer (ZeRO-1
  style sharded state) when ``parallel.use_distributed_optimizer`` and DP > 1. bf16/fp16
  params get fp32 main weights.
* ``OptimizerParamScheduler``: linear warmup over ``train.lr_warmup_steps`` optimizer
  updates, then ``train.lr_decay_style`` from ``lr`` to ``min_lr`` over the run's total
  updates (``train_iters`` rollout steps x N updates each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_vespo.parallel.config import ParallelConfig
from megatron_vespo.train.config import TrainConfig


@dataclass
class OptimizerBundle:
    """What ``build_optimizer`` returns."""

    model: list[Any]  # DDP-wrapped chunks
    optimizer: Any
    scheduler: Any
    total_updates: int


def build_optimizer(model_chunks: list[torch.nn.Module], train: TrainConfig, parallel: ParallelConfig,
                    dp_size: int, fp8: Any = None) -> OptimizerBundle:
    """Wrap ``model_chunks`` in Megatron DDP and build optimizer + LR scheduler.

    ``fp8`` (an ``FP8Config``) adds the FP8 DDP / optimizer fields (``fp8/te.py``); FP8
    parameters (``fp8.fp8_param_gather``) need the distributed optimizer even at DP 1, since
    only it re-quantises them from the FP32 main weights.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_vespo.fp8.te import fp8_ddp_kwargs, fp8_optimizer_kwargs

    tf_config = model_chunks[0].config
    fp8_params = bool(fp8_ddp_kwargs(fp8).get("fp8_param_gather"))
    train.check_optimizer_layout(parallel)
    # the precision-aware optimizer and CPU offload run inside DistributedOptimizer, so it is used
    # even at DP 1 (where it shards nothing) when they are on
    memory_opts = train.use_precision_aware_optimizer or train.optimizer_cpu_offload
    use_dist_opt = bool(parallel.use_distributed_optimizer and (dp_size > 1 or fp8_params or memory_opts))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,  # overlap needs CUDA streams; the gain on small steps is nil
        use_distributed_optimizer=use_dist_opt,
        # fp16: loss-scale overflows are expected and handled by the optimizer (found_inf ->
        # skipped step, smaller scale); DDP's check would abort the run on the first one
        check_for_nan_in_grad=not tf_config.fp16,
        **fp8_ddp_kwargs(fp8),
    )
    wrapped = [DistributedDataParallel(config=tf_config, ddp_config=ddp_config, module=m,
                                       disable_bucketing=(i > 0)) for i, m in enumerate(model_chunks)]
    for m in wrapped:
        m.broadcast_params()  # same starting weights on every DP replica
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad if train.clip_grad > 0 else 0.0,
        use_distributed_optimizer=use_dist_opt,
        bf16=tf_config.bf16,
        fp16=tf_config.fp16,
        params_dtype=tf_config.params_dtype,
        **memory_optimizer_kwargs(train),
        **fp8_optimizer_kwargs(fp8),
    )
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    _foreach_on_cpu(optimizer, fused=train.cpu_adam == "fused")
    use_foreach_multi_tensor_ops()
    tf_config.finalize_model_grads_func = finalize_model_grads
    # the schedule multiplies each micro-batch loss by this before backward (schedules.py
    # backward_step); fp16's optimizer divides the gradients by the same loss scale in step(),
    # so without it fp16 updates were 2**-32 too small. bf16/fp32: scale 1.
    tf_config.grad_scale_func = optimizer.scale_loss
    tf_config.no_sync_func = [m.no_sync for m in wrapped]
    if len(wrapped) == 1:
        tf_config.no_sync_func = tf_config.no_sync_func[0]
    total = max(train.train_iters * train.staleness, 1)
    warmup = min(train.lr_warmup_steps, total - 1) if total > 1 else 0
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else train.lr,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
    )
    return OptimizerBundle(model=wrapped, optimizer=optimizer, scheduler=scheduler, total_updates=total)


def memory_optimizer_kwargs(train: TrainConfig) -> dict[str, Any]:
    """``OptimizerConfig`` fields for CPU Adam and the precision-aware optimizer (megatron-core 0.16.1).

    Raises ConfigError when the precision-aware optimizer is asked for without Transformer
    Engine: megatron-core 0.16.1 ``OptimizerConfig.__post_init__`` reads TE's version
    (``is_te_min_version``, a TypeError without TE) and, without CPU offload, needs TE's
    ``FusedAdam``; the error would otherwise come from deep inside Megatron.
    """
    from megatron_vespo.config.base import ConfigError
    from megatron_vespo.utils.imports import is_available

    kw: dict[str, Any] = {"use_precision_aware_optimizer": train.use_precision_aware_optimizer}
    if train.use_precision_aware_optimizer and not is_available("transformer_engine.pytorch.optimizers"):
        raise ConfigError("train.use_precision_aware_optimizer needs Transformer Engine (GPU; pip install "
                          "'megatron_vespo[fp8]'): set it to false on machines without TE")
    if train.optimizer_cpu_offload:
        cuda = torch.cuda.is_available()
        kw.update(
            optimizer_cpu_offload=True,
            optimizer_offload_fraction=train.optimizer_offload_fraction,
            # overlap the D2H grad copy / CPU step / H2D param copy (slime's recipe); both need CUDA
            # streams and pinned memory, so they are off on a CPU-only machine
            overlap_cpu_optimizer_d2h_h2d=cuda,
            pin_cpu_grads=cuda,
            pin_cpu_params=cuda,
        )
    return kw


def current_lr(optimizer: Any) -> float:
    """Learning rate of the first param group (all groups share it here)."""
    return float(optimizer.param_groups[0]["lr"])


def _foreach_on_cpu(optimizer: Any, fused: bool = False) -> None:
    """Use torch's multi-tensor (``foreach``) Adam on CPU too, or its fused CPU kernel (``train.cpu_adam``).

    Without TE / Apex, megatron falls back to ``torch.optim.AdamW``, whose ``foreach=None``
    picks the per-parameter Python loop for CPU tensors: on a small MoE (hundreds of expert
    tensors) that loop was ~15% of a CPU update (issue 15). Same update up to rounding.
    ``fused``: ``torch.optim.AdamW(fused=True)``'s kernel (CPU since torch 2.4), 3-5x faster than
    foreach on the step; it rounds differently in the last bits.
    """
    if torch.cuda.is_available():
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and type(inner).__module__.startswith("torch.optim"):
            for group in inner.param_groups:
                if fused:
                    group["foreach"], group["fused"] = False, True
                elif group.get("foreach") is None:
                    group["foreach"] = True


def foreach_l2_norm(chunk_size: int, noop_flag: Any, tensor_lists: list, per_tensor: bool, *args: Any) -> tuple:
    """Drop-in for megatron's ``local_multi_tensor_l2_norm`` (megatron-core 0.16.1 ``utils.py``) in one foreach call.

    Same result, bit for bit: ``torch._foreach_norm`` computes each tensor's 2-norm with the
    kernel ``torch.norm`` uses, and the norms are reduced the same way; the per-tensor Python
    loop (and, inside ``get_grad_norm_fp32``'s device scope, one ``TorchFunctionMode`` callback
    per tensor) is gone.
    """
    norms = [n for lst in tensor_lists for n in (torch._foreach_norm(lst) if lst else [])]
    total = torch.norm(torch.stack(norms)) if norms else torch.zeros((), dtype=torch.float)
    return total.detach().reshape(1).to(torch.float), None


def foreach_scale(chunk_size: int, noop_flag: Any, tensor_lists: list, scale: float) -> None:
    """Drop-in for megatron's ``local_multi_tensor_scale``: ``dst = src * scale`` per pair, as foreach ops."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)  # gradient clipping scales the grads in place
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_multi_tensor_ops() -> None:
    """On CPU (no Apex / TE kernels), make megatron's clip-grad norm and scale use the foreach versions.

    Megatron falls back to per-tensor Python loops (``local_multi_tensor_l2_norm`` /
    ``local_multi_tensor_scale``) when neither TE nor Apex is installed; on a small MoE with
    ~100 gradient tensors the norm and the clip were ~10 ms of a ~170 ms update (issue 15).
    Only those fallbacks are replaced (a TE / Apex kernel is left alone).
    """
    if torch.cuda.is_available():
        return
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mopt

    for mod in (clip_grads, mopt):
        if getattr(mod, "l2_norm_impl", None) is mutils.local_multi_tensor_l2_norm:
            mod.l2_norm_impl = foreach_l2_norm
        if getattr(mod, "multi_tensor_scale_impl", None) is mutils.local_multi_tensor_scale:
            mod.multi_tensor_scale_impl = foreach_scale
