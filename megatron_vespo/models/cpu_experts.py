"""The local-spec MoE experts on CPU without Megatron's per-expert module machinery.

Without Transformer Engine, megatron-core 0.16.1 runs the routed experts as ``SequentialMLP``
(``transformer/moe/experts.py``): per expert an ``MLP`` whose ``linear_fc1`` / ``linear_fc2``
are ``ColumnParallelLinear`` / ``RowParallelLinear`` going through
``LinearWithGradAccumulationAndAsyncCommunication`` (``tensor_parallel/layers.py``). With
expert tensor parallelism 1 those wrappers do no communication, but their Python (TP and
sequence-parallel checks, async all-reduce set-up, weight-gradient deferral) runs for every
expert of every layer, forward and backward: on the 8-expert addition model of issue 15 it was
about 3 ms of each layer's expert forward + backward (~20 ms), i.e. ~12 ms of a ~160 ms update.

:class:`CpuSequentialMLP` is a ``SequentialMLP`` (same parameters, names, state dicts and
checkpoints) whose forward computes the same operations on the same parameters directly:
``x @ W1^T``, ``torch.chunk`` into gate / linear halves, ``activation(gate) * (linear +
glu_linear_offset)``, times the routing probabilities, ``@ W2^T``, concatenated in expert order.
The linear layers use :class:`_ExpertLinear`, whose backward is Megatron's (``grad_input =
grad_output @ W``, ``grad_weight = grad_output^T @ input``), so outputs and gradients are the
same bits (``tests/train/test_cpu_experts.py`` compares them with ``SequentialMLP``).

The fast path is taken only where it is exactly Megatron's computation: CPU tensors, expert
TP size 1, no FP8/FP4 (nor the CPU FP8 emulation, which replaces the linears' ``_forward_impl``),
no bias, gated SiLU-style activation without clamping or TE activation, probabilities applied
after the activation, no gradient-accumulation fusion or deferred weight gradients, no hooks on
the expert linears. Anything else runs ``SequentialMLP.forward`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

try:  # megatron-core is optional for `import megatron_vespo`
    from megatron.core.transformer.moe.experts import SequentialMLP
except ImportError:  # pragma: no cover - only without megatron-core
    SequentialMLP = None  # type: ignore[assignment,misc]


class _ExpertLinear(torch.autograd.Function):
    """``y = x @ W^T`` with Megatron's backward GEMMs (``LinearWithGradAccumulationAndAsyncCommunication``, TP 1)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.matmul(x, weight.t())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        x, weight = ctx.saved_tensors
        grad_x = grad_output.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_output.t().matmul(x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def _plain_linear(linear: Any) -> bool:
    """True when ``linear`` (a Column/RowParallelLinear of an expert) computes just ``x @ W^T``."""
    return (getattr(linear, "bias", None) is None and not getattr(linear, "sequence_parallel", False)
            and not getattr(linear, "gradient_accumulation_fusion", False)
            and "_forward_impl" not in vars(linear) and "forward" not in vars(linear)
            and not linear._forward_hooks and not linear._forward_pre_hooks
            and isinstance(getattr(linear, "weight", None), torch.Tensor))


if SequentialMLP is not None:

    class CpuSequentialMLP(SequentialMLP):
        """``SequentialMLP`` whose CPU forward skips the per-expert Megatron linear wrappers (same bits)."""

        def _fast_path(self, hidden: torch.Tensor) -> bool:
            cfg = self.config
            if hidden.device.type != "cpu" or self.num_local_experts < 1:
                return False
            if self.tp_group is not None and self.tp_group.size() != 1:
                return False
            if (cfg.fp8 or getattr(cfg, "fp4", None) or getattr(cfg, "use_te_activation_func", False)
                    or cfg.bias_activation_fusion or not cfg.gated_linear_unit or cfg.moe_apply_probs_on_input
                    or getattr(cfg, "activation_func_clamp_value", None) is not None
                    or getattr(cfg, "delay_wgrad_compute", False)):
                return False
            return all(_plain_linear(e.linear_fc1) and _plain_linear(e.linear_fc2)
                       and not e._forward_hooks and not e._forward_pre_hooks and "forward" not in vars(e)
                       for e in self.local_experts)

        def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                    permuted_probs: torch.Tensor) -> tuple:
            """Same result as ``SequentialMLP.forward`` (which runs whenever the fast path does not apply)."""
            if not self._fast_path(permuted_local_hidden_states):
                return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
            cfg = self.config
            counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else tokens_per_expert
            if self.num_local_experts == 1:
                counts = [permuted_local_hidden_states.shape[0]]
            tokens = torch.split(permuted_local_hidden_states, counts)
            probs = torch.split(permuted_probs, counts)
            outs = []
            for expert, x, p in zip(self.local_experts, tokens, probs):
                h = _ExpertLinear.apply(x, expert.linear_fc1.weight)
                gate, lin = torch.chunk(h, 2, dim=-1)
                h = cfg.activation_func(gate) * (lin + cfg.glu_linear_offset)
                h = (h * p.unsqueeze(-1)).to(h.dtype)
                outs.append(_ExpertLinear.apply(h, expert.linear_fc2.weight))
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
            return out, None


def use_cpu_experts(block_spec: Any) -> int:
    """Swap ``SequentialMLP`` for :class:`CpuSequentialMLP` in a decoder-block spec; returns how many."""
    if SequentialMLP is None:
        return 0
    n = 0
    for layer in getattr(block_spec, "layer_specs", None) or [block_spec]:
        mlp = getattr(getattr(layer, "submodules", None), "mlp", None)
        experts = getattr(getattr(mlp, "submodules", None), "experts", None)
        if experts is not None and getattr(experts, "module", None) is SequentialMLP:
            experts.module = CpuSequentialMLP
            n += 1
    return n
