"""Activation memory of one micro-batch on one rank: the formula, and a way to measure it on CPU.

The formula counts, tensor by tensor, what autograd saves for backward in each transformer layer
of megatron-core 0.16.1 (``transformer_layer.py``, ``attention.py``, ``dot_product_attention.py``,
``moe/router.py``, ``moe/token_dispatcher.py``, ``moe/experts.py`` SequentialMLP) plus the
log-prob computation of ``train/logprobs.py``. Per token of the micro-batch (T = b x S tokens,
t = TP size; with sequence parallelism the [S, b, h] tensors are split over TP, heads are split
over TP on the full sequence):

==========================  =====================================================  =========
term                        saved elements per token                               dtype
==========================  =====================================================  =========
input / pre-MLP RMSNorm     2 x (2h + 1) / t  (input, normalised input, rsqrt)      params
linear_qkv, linear_proj     h / t + a d / t   (their inputs)                        params
q / k norm                  (2 a d + a) / t + ((a + 2g) d + g + g d) / t            params
core attention (local)      3 a d / t + a S / t  (q, k, v with KV repeated; probs)  params
core attention (TE, flash)  (2 a d + 2 g d) / t + a / t (q, k, v, out; lse fp32)    params
router                      h / t + 2k/t int64 + k/t fp32 + E/t bool + E/t fp32     mixed
experts (local)             k (h + 6 f) / t  + k / t fp32  (permuted input, SwiGLU) params
experts (TE, fused SwiGLU)  k (h + 3 f) / t  + k / t fp32                           params
final norm + output input   (2h + 1) / t + h / t                                    params
log-probs                   2 V / t  (shifted logits, exp; full sequence)           fp32
==========================  =====================================================  =========

plus per layer the causal mask (S^2 bytes, local spec) and RoPE tables (4 S d fp32). a, g = query /
KV heads, d = head dim, E = experts, k = top-k, f = expert width, V = vocabulary. Routed tokens
assume balanced routing (each rank's experts receive k T / t token copies under the alltoall
dispatcher). The local-spec numbers are what the CPU build saves (a test measures them with
``saved_tensors_hooks``); the TE column is for GPU runs, where Transformer Engine's flash attention
saves no S x S scores and its fused SwiGLU keeps fewer copies.

Recompute (megatron-core ``transformer_block.py`` ``_checkpointed_forward``): ``selective``
(core_attn) keeps only the attention's inputs; ``full`` + ``uniform`` keeps each group's input
(h / t per token) and re-creates one group of ``recompute_num_layers`` layers at a time;
``full`` + ``block`` recomputes the first ``recompute_num_layers`` layers of the stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

_FP32, _I64 = 4, 8


@dataclass(frozen=True)
class ActivationInputs:
    """The shapes the formula needs (from the HF config and the job)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    topk: int
    expert_ffn: int
    dense_ffn: int
    moe_layers: int  # MoE layers on this pipeline stage
    dense_layers: int  # dense-MLP layers on this stage
    last_stage: bool = True

    @classmethod
    def from_hf(cls, hf_cfg: Any, layers: Optional[Iterable[int]] = None,
                last_stage: bool = True) -> "ActivationInputs":
        """Dims of ``hf_cfg``; ``layers`` = the global layer ids on this stage (default: all)."""
        from megatron_vespo.models.qwen3_moe import head_dim, moe_layer_pattern

        pattern = moe_layer_pattern(hf_cfg)
        ids = list(range(len(pattern))) if layers is None else list(layers)
        n_moe = sum(pattern[i] for i in ids)
        return cls(hidden=hf_cfg.hidden_size, heads=hf_cfg.num_attention_heads, kv_heads=hf_cfg.num_key_value_heads,
                   head_dim=head_dim(hf_cfg), vocab=hf_cfg.vocab_size, experts=int(getattr(hf_cfg, "num_experts", 0)),
                   topk=int(getattr(hf_cfg, "num_experts_per_tok", 0)),
                   expert_ffn=int(getattr(hf_cfg, "moe_intermediate_size", 0)), dense_ffn=hf_cfg.intermediate_size,
                   moe_layers=n_moe, dense_layers=len(ids) - n_moe, last_stage=last_stage)


def layer_bytes(d: ActivationInputs, tokens: int, seq: int, micro: int, tp: int, nbytes: int, *, moe: bool,
                spec: str = "local", selective: bool = False) -> float:
    """Bytes one transformer layer saves for backward (see the module table)."""
    h, a, g, hd, k, E = d.hidden, d.heads, d.kv_heads, d.head_dim, d.topk, d.experts
    if spec == "local":
        # torch RMSNorm on CPU upcasts: input, normalised input and rsqrt kept in fp32. The k norm's
        # input is a view of the fused qkv output in fp32, a fresh fp32 copy of k otherwise.
        k_in = (a + 2 * g) * hd if nbytes == _FP32 else g * hd
        norms = (2 * (2 * h + 1) + 2 * a * hd + a + k_in + g + g * hd) * _FP32
    else:  # TE norms keep the input in the params dtype and rsigma in fp32
        norms = (2 * 2 * h + 2 * a * hd + 2 * g * hd) * nbytes + (2 + a + g) * _FP32
    per_tok = norms / tp + (h + a * hd) * nbytes / tp  # + linear_qkv and linear_proj inputs
    fixed = 4 * seq * hd * nbytes  # RoPE cos/sin tables
    if selective:
        per_tok += (a * hd + 2 * g * hd) * nbytes / tp  # the checkpoint keeps q, k, v
    elif spec == "local":
        # q, k, v (KV heads repeated) and the softmax output in fp32 (+ its cast for the bmm)
        per_tok += (3 * a * hd * nbytes + a * seq * (_FP32 + (nbytes if nbytes != _FP32 else 0))) / tp
        fixed += seq * seq  # bool causal mask
    else:  # flash attention: q, k, v, output and the fp32 log-sum-exp
        per_tok += ((2 * a * hd + 2 * g * hd) * nbytes + a * _FP32) / tp
    width = 6 if spec == "local" else 3  # SwiGLU copies kept (fused in TE: fc1 output + fc2 input)
    if moe:
        router = (h * nbytes + k * (2 * _I64 + _FP32) + E * (1 + _FP32)) / tp
        experts = k * ((h + width * d.expert_ffn) * nbytes + _FP32) / tp
        per_tok += router + experts
    else:
        per_tok += (h + (width - 1) * d.dense_ffn) * nbytes / tp  # no routing-probability product
    return per_tok * tokens + fixed


def micro_batch_activation_bytes(d: ActivationInputs, *, micro: int, seq: int, tp: int, nbytes: int,
                                 spec: str = "local", recompute: Optional[str] = None,
                                 recompute_method: Optional[str] = None, recompute_num_layers: Optional[int] = None,
                                 with_logprobs: bool = True) -> dict[str, float]:
    """Bytes saved for backward by one micro-batch on one rank, by term.

    ``recompute``: None | "selective" | "full" (then ``recompute_method`` uniform/block and
    ``recompute_num_layers`` as in Megatron). Returns ``{"layers", "recompute_peak", "embedding",
    "final", "logprobs", "total"}``: ``layers`` is what stays saved after the forward,
    ``recompute_peak`` what a full-recompute backward re-creates at once on top of it.
    """
    tokens = micro * seq
    n_layers = d.moe_layers + d.dense_layers
    moe_b = layer_bytes(d, tokens, seq, micro, tp, nbytes, moe=True, spec=spec, selective=recompute == "selective")
    dense_b = layer_bytes(d, tokens, seq, micro, tp, nbytes, moe=False, spec=spec,
                          selective=recompute == "selective")
    every = d.moe_layers * moe_b + d.dense_layers * dense_b
    biggest = moe_b if d.moe_layers else dense_b
    ckpt_input = tokens * d.hidden / tp * nbytes
    peak = 0.0
    if recompute == "full" and n_layers:
        n = max(1, min(recompute_num_layers or 1, n_layers))
        if recompute_method == "block":
            layers = every - n * biggest + n * ckpt_input
            peak = biggest  # one recomputed layer's activations at a time
        else:  # uniform: one input per group, one group re-created at a time in backward
            layers = math.ceil(n_layers / n) * ckpt_input
            peak = n * biggest
    else:
        layers = every
    out = {"layers": layers, "recompute_peak": peak, "embedding": tokens * _I64}
    if d.last_stage:
        norm = (2 * d.hidden + 1) * _FP32 if spec == "local" else 2 * d.hidden * nbytes + _FP32
        out["final"] = tokens * (norm + d.hidden * nbytes) / tp
        out["logprobs"] = (micro * (seq - 1) * 2 * d.vocab / tp * _FP32) if with_logprobs else 0.0
    out["total"] = sum(out.values())
    return out


def measure_saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """Run ``fn`` and return (its result, bytes of the distinct storages autograd saved for backward).

    Tensors sharing a storage are counted once; storages of ``exclude`` (the parameters) are not
    counted. This is the "real bytes" the formula is checked against on CPU.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())
