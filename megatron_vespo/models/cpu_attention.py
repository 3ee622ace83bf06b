"""The local-spec core attention on CPU through torch's fused kernel (``scaled_dot_product_attention``).

Without Transformer Engine, megatron-core 0.16.1 computes attention with ``DotProductAttention``
(``transformer/dot_product_attention.py``): ``baddbmm`` of Q and K^T scaled by
``1/sqrt(head_dim)``, a causal mask built and applied by ``FusedScaleMaskSoftmax`` (whose CPU path
is ``masked_fill(-10000)`` + ``torch.nn.Softmax``), dropout, ``bmm`` with V. On GPU Megatron runs
a fused kernel instead (TE's ``FusedAttention`` / flash attention); on CPU the unfused chain
materialises the [b, heads, s, s] scores, masks and probabilities and their gradients: on the
addition model of issue 15 it was ~2 ms of each layer's ~8 ms attention forward + backward
against transformers' SDPA path (``tools/bench_train_step.py``, docs/performance.md).

:class:`CpuDotProductAttention` is a ``DotProductAttention`` (same config, no parameters of its
own in the vanilla softmax case) whose forward calls ``torch.nn.functional.scaled_dot_product_attention``
with ``is_causal=True`` and the same scale, as transformers' Qwen3-MoE does on CPU. The math is the
same; the summation order is not, so outputs agree to float rounding (~1e-7 relative in fp32), not
bit for bit (``tests/train/test_cpu_attention.py`` bounds forward and gradients against
``DotProductAttention``). A masked position gets probability exactly 0 either way (Megatron's
-10000 and SDPA's -inf both underflow ``exp`` in fp32).

The fused path is taken only where it is that computation: CPU fp32 tensors, self-attention of
equal query and key lengths with the causal mask type and no explicit mask, no attention bias,
no packed sequences, the vanilla softmax, no sliding window, no query-key layer scaling, and
attention dropout 0 (or eval mode). Anything else runs ``DotProductAttention.forward`` unchanged.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

try:  # megatron-core is optional for `import megatron_vespo`
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
except ImportError:  # pragma: no cover - only without megatron-core
    DotProductAttention = None  # type: ignore[assignment,misc]


if DotProductAttention is not None:

    class CpuDotProductAttention(DotProductAttention):
        """``DotProductAttention`` whose CPU fp32 causal forward is torch's fused SDPA kernel."""

        def _fused_path(self, query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        attn_mask_type: Optional[Any], attention_bias: Any, packed_seq_params: Any) -> bool:
            cfg = self.config
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            return (query.device.type == "cpu" and query.dtype == torch.float32 and key.dtype == torch.float32
                    and attention_mask is None and attention_bias is None and packed_seq_params is None
                    and mask_type == AttnMaskType.causal and query.size(0) == key.size(0)
                    and self.softmax_offset is None and self.scale_mask_softmax.window_size is None
                    and not cfg.apply_query_key_layer_scaling
                    and (self.attention_dropout.p == 0.0 or not self.training))

        def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[Any] = None,
                    attention_bias: Optional[torch.Tensor] = None, packed_seq_params: Any = None) -> torch.Tensor:
            """Same result as ``DotProductAttention.forward`` up to float rounding (see the module docstring).

            Shapes: query [sq, b, np, hn], key / value [sk, b, ng, hn] -> context [sq, b, np * hn].
            """
            if not self._fused_path(query, key, attention_mask, attn_mask_type, attention_bias, packed_seq_params):
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params)
            sq, b, heads, _ = query.shape
            # grouped-query attention: query head i reads K/V group i // (heads / groups), the head
            # order of Megatron's repeat_interleave; SDPA's enable_gqa maps heads the same way without
            # materialising the repeated K/V and their gradients (same bits: test_cpu_attention.py)
            gqa = heads != key.size(2)
            # [s, b, n, h] -> [b, n, s, h]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                                   enable_gqa=gqa)
            # [b, n, s, h] -> [s, b, n * h]
            return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def use_cpu_attention(block_spec: Any) -> int:
    """Swap ``DotProductAttention`` for :class:`CpuDotProductAttention` in a decoder-block spec; returns how many."""
    if DotProductAttention is None:
        return 0
    n = 0
    for layer in getattr(block_spec, "layer_specs", None) or [block_spec]:
        attn = getattr(getattr(layer, "submodules", None), "self_attention", None)
        subs = getattr(attn, "submodules", None)
        core = getattr(subs, "core_attention", None)
        if core is DotProductAttention:
            subs.core_attention = CpuDotProductAttention
            n += 1
        elif getattr(core, "module", None) is DotProductAttention:
            core.module = CpuDotProductAttention
            n += 1
    return n
