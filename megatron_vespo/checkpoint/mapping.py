"""Name and layout mapping between Hugging Face Qwen3-MoE and Megatron-Core ``GPTModel``.

This is the only copy of the mapping: HF -> Megatron import, Megatron -> HF export (the
``mcore-to-hf`` converter and weight sync to the rollout engine) all go through it.
Pure torch, no Megatron import.

Canonical Megatron names are the *local-spec* parameter names with the global layer index and
the global expert index (``decoder.layers.3.mlp.experts.local_experts.17.linear_fc1.weight``).
Transformer-Engine-spec and grouped-GEMM names are mapped onto them by :func:`canonical_name`.

Layouts (dim 0 = output features, as in ``nn.Linear``):

* ``linear_qkv``: rows grouped by KV head; group g holds ``[q heads g*r .. g*r+r-1, k_g, v_g]``
  with r = heads / kv_heads, each head ``head_dim`` rows (megatron-core
  ``SelfAttention.get_query_key_value_tensors``). TP splits the fused rows contiguously, which
  also covers TP > kv_heads (megatron all-gathers and re-slices there).
* ``linear_fc1`` (dense and experts): ``[gate; up]``. TP splits gate and up separately and each
  rank holds ``[gate_r; up_r]`` (megatron-core ``apply_swiglu_sharded_factory``).
* ``linear_proj`` / ``linear_fc2``: row-parallel, TP splits dim 1.
* ``word_embeddings`` / ``output_layer``: vocab-parallel, rows padded with zeros to the model's
  padded vocab size, TP splits dim 0; export strips the padding.
* Experts: EP rank e holds global experts ``e*L .. e*L+L-1`` (L local experts); expert weights are
  split over the expert-tensor-parallel group, not the TP group.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from megatron_vespo.models.dims import (  # noqa: F401  (re-exported: the mapping's public names)
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    Qwen3MoeDims,
)

Kind = Literal["copy", "qkv", "gate_up"]


@dataclass(frozen=True)
class ParamRule:
    """One Megatron parameter: its canonical name, the HF tensors it is made of, and how it is split.

    ``tp_dim`` is the dim split over tensor parallelism (None = replicated); for ``gate_up`` the
    split applies to gate and up separately. ``expert`` is the global expert index (EP-sharded,
    split over expert-TP) or None. ``vocab`` marks vocab-parallel tensors padded on dim 0.
    """

    mcore: str
    hf: tuple
    kind: Kind = "copy"
    tp_dim: Optional[int] = None
    vocab: bool = False
    expert: Optional[int] = None

    def hf_shapes(self, dims: Qwen3MoeDims) -> list[tuple]:
        """Full (unsharded) shapes of this rule's HF tensors, in ``hf`` order."""
        return [hf_shape(name, dims) for name in self.hf]


def _layer_rules(dims: Qwen3MoeDims, i: int) -> list[ParamRule]:
    hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
    rules = [
        ParamRule(mc + "input_layernorm.weight", (hf + "input_layernorm.weight",)),
        ParamRule(mc + "self_attention.linear_qkv.weight",
                  tuple(hf + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv", tp_dim=0),
        ParamRule(mc + "self_attention.q_layernorm.weight", (hf + "self_attn.q_norm.weight",)),
        ParamRule(mc + "self_attention.k_layernorm.weight", (hf + "self_attn.k_norm.weight",)),
        ParamRule(mc + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",), tp_dim=1),
        ParamRule(mc + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",)),
    ]
    if i in dims.moe_layers:
        rules.append(ParamRule(mc + "mlp.router.weight", (hf + "mlp.gate.weight",)))
        for e in range(dims.num_experts):
            he, me = hf + f"mlp.experts.{e}.", mc + f"mlp.experts.local_experts.{e}."
            rules.append(ParamRule(me + "linear_fc1.weight", (he + "gate_proj.weight", he + "up_proj.weight"),
                                   "gate_up", tp_dim=0, expert=e))
            rules.append(ParamRule(me + "linear_fc2.weight", (he + "down_proj.weight",), tp_dim=1, expert=e))
    else:
        rules.append(ParamRule(mc + "mlp.linear_fc1.weight",
                               (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"), "gate_up", tp_dim=0))
        rules.append(ParamRule(mc + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), tp_dim=1))
    return rules


def build_rules(dims: Qwen3MoeDims) -> list[ParamRule]:
    """Every parameter of the model, in a fixed order shared by all ranks (export relies on it)."""
    return list(_rules(dims))


@functools.lru_cache(maxsize=8)
def _rules(dims: Qwen3MoeDims) -> tuple[ParamRule, ...]:
    """``build_rules`` cached per (frozen) dims: every weight sync maps the model again (~1 ms of rules here)."""
    rules = [ParamRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_dim=0, vocab=True)]
    for i in range(dims.num_layers):
        rules.extend(_layer_rules(dims, i))
    rules.append(ParamRule("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not dims.tie_word_embeddings:
        rules.append(ParamRule("output_layer.weight", ("lm_head.weight",), tp_dim=0, vocab=True))
    return tuple(rules)


def hf_shape(name: str, dims: Qwen3MoeDims) -> tuple:
    """Full shape of an HF Qwen3-MoE tensor, derived from the config (used to validate inputs)."""
    h, hd = dims.hidden_size, dims.head_dim
    tail_shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (dims.num_attention_heads * hd, h),
        "self_attn.k_proj.weight": (dims.num_key_value_heads * hd, h),
        "self_attn.v_proj.weight": (dims.num_key_value_heads * hd, h),
        "self_attn.o_proj.weight": (h, dims.num_attention_heads * hd),
        "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
        "mlp.gate.weight": (dims.num_experts, h),
        "mlp.gate_proj.weight": (dims.intermediate_size, h), "mlp.up_proj.weight": (dims.intermediate_size, h),
        "mlp.down_proj.weight": (h, dims.intermediate_size),
    }
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (dims.vocab_size, h)
    if name == "model.norm.weight":
        return (h,)
    m = re.fullmatch(r"model\.layers\.\d+\.(.+)", name)
    if m:
        tail = m.group(1)
        if tail in tail_shapes:
            return tail_shapes[tail]
        em = re.fullmatch(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight", tail)
        if em:
            i = dims.moe_intermediate_size
            return (h, i) if em.group(1) == "down" else (i, h)
    raise KeyError(f"not a Qwen3-MoE tensor name: {name}")


# ----------------------------------------------------------------------------- full-tensor layout
def hf_to_mcore(rule: ParamRule, tensors: Sequence[torch.Tensor], dims: Qwen3MoeDims) -> torch.Tensor:
    """Combine the HF tensors of ``rule`` (in ``rule.hf`` order) into the full Megatron tensor."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "gate_up":
        return torch.cat([tensors[0], tensors[1]], dim=0)
    q, k, v = tensors
    g, hd, h = dims.num_key_value_heads, dims.head_dim, q.shape[-1]
    r = dims.num_attention_heads // g
    qkv = torch.cat([q.reshape(g, r * hd, h), k.reshape(g, hd, h), v.reshape(g, hd, h)], dim=1)
    return qkv.reshape(g * (r + 2) * hd, h)


def mcore_to_hf_views(rule: ParamRule, full: torch.Tensor, dims: Qwen3MoeDims) -> list[tuple[str, torch.Tensor]]:
    """:func:`mcore_to_hf` without copies: each HF tensor as a (strided) view of ``full``.

    Same values, and the same shapes except q/k/v, which stay ``[kv_heads, rows per head, hidden]``
    (their HF tensor is that, row-major, reshaped to ``[kv_heads * rows, hidden]``).
    """
    if rule.kind == "copy":
        return [(rule.hf[0], full)]
    if rule.kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return [(rule.hf[0], gate), (rule.hf[1], up)]
    g, hd, h = dims.num_key_value_heads, dims.head_dim, full.shape[-1]
    r = dims.num_attention_heads // g
    q, k, v = full.reshape(g, (r + 2) * hd, h).split([r * hd, hd, hd], dim=1)
    return [(rule.hf[0], q), (rule.hf[1], k), (rule.hf[2], v)]


def mcore_to_hf(rule: ParamRule, full: torch.Tensor, dims: Qwen3MoeDims) -> list[tuple[str, torch.Tensor]]:
    """Split a full Megatron tensor into ``(hf_name, tensor)`` pairs (inverse of :func:`hf_to_mcore`)."""
    qkv, h = rule.kind not in ("copy", "gate_up"), full.shape[-1]
    return [(name, (t.reshape(-1, h) if qkv else t).contiguous()) for name, t in mcore_to_hf_views(rule, full, dims)]


# ----------------------------------------------------------------------------- tensor parallel
def pad_vocab(t: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows so dim 0 has ``padded_rows`` rows (megatron pads the vocab to divide TP)."""
    if padded_rows < t.shape[0]:
        raise ValueError(f"padded vocab size {padded_rows} is smaller than the vocab size {t.shape[0]}")
    if padded_rows == t.shape[0]:
        return t
    return torch.cat([t, t.new_zeros((padded_rows - t.shape[0], *t.shape[1:]))], dim=0)


def tp_shard(rule: ParamRule, full: torch.Tensor, rank: int, size: int,
             padded_vocab: Optional[int] = None) -> torch.Tensor:
    """The slice of the full Megatron tensor held by tensor-parallel ``rank`` of ``size``."""
    if rule.vocab:
        full = pad_vocab(full, padded_vocab if padded_vocab is not None else full.shape[0])
    if rule.tp_dim is None or size == 1:
        return full
    if full.shape[rule.tp_dim] % (2 * size if rule.kind == "gate_up" else size):
        raise ValueError(f"{rule.mcore}: dim {rule.tp_dim} of size {full.shape[rule.tp_dim]} is not divisible "
                         f"by the tensor-parallel size {size}")
    if rule.kind == "gate_up":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0).contiguous()
    return full.chunk(size, dim=rule.tp_dim)[rank].contiguous()


def tp_unshard(rule: ParamRule, shards: Sequence[torch.Tensor], vocab_size: Optional[int] = None) -> torch.Tensor:
    """Reassemble the full tensor from the shards of all TP ranks (in rank order); strips vocab padding."""
    if rule.tp_dim is None or len(shards) == 1:
        full = shards[0]
    elif rule.kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        full = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    else:
        full = torch.cat(list(shards), dim=rule.tp_dim)
    if rule.vocab and vocab_size is not None:
        full = full[:vocab_size]
    return full


# ----------------------------------------------------------------------------- parameter names
_TE_ALIASES = (
    # TE spec fuses the input norm into linear_qkv and the dense pre-MLP norm into linear_fc1.
    (re.compile(r"(decoder\.layers\.\d+\.)self_attention\.linear_qkv\.layer_norm_weight$"),
     r"\1input_layernorm.weight"),
    (re.compile(r"(decoder\.layers\.\d+\.)mlp\.linear_fc1\.layer_norm_weight$"), r"\1pre_mlp_layernorm.weight"),
    # TEGroupedMLP stores expert j as linear_fc{1,2}.weight{j}.
    (re.compile(r"(decoder\.layers\.\d+\.mlp\.experts\.)linear_fc([12])\.weight(\d+)$"),
     r"\1local_experts.\3.linear_fc\2.weight"),
)
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_UNSUPPORTED = re.compile(r"\.mlp\.experts\.weight[12]$|\.mlp\.shared_experts?\.|\.bias$|expert_bias$")


@functools.lru_cache(maxsize=1 << 16)  # a pure function of its arguments, called per parameter in every sync
def canonical_name(local_name: str, layer_offset: int = 0, expert_offset: int = 0) -> str:
    """Map a rank-local Megatron parameter name (local or TE spec) to its canonical global name.

    ``layer_offset`` is the pipeline stage's first layer, ``expert_offset`` = ep_rank * num_local_experts.
    """
    name = local_name
    while name.startswith("module."):  # DDP / Float16Module wrappers nest one "module." each
        name = name[len("module."):]
    if _UNSUPPORTED.search(name):
        raise ValueError(f"parameter {local_name!r} is not supported by the Qwen3-MoE mapping "
                         "(legacy GroupedMLP, shared experts or biases)")
    for pattern, repl in _TE_ALIASES:
        name = pattern.sub(repl, name)
    if layer_offset:
        name = _LAYER_RE.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)
    if expert_offset:
        name = _EXPERT_RE.sub(lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + expert_offset}.", name)
    return name


def rules_by_mcore(dims: Qwen3MoeDims) -> dict[str, ParamRule]:
    """``{canonical megatron name: rule}``."""
    return {r.mcore: r for r in build_rules(dims)}


def expected_hf_names(dims: Qwen3MoeDims) -> set[str]:
    """The exact set of tensor names an HF Qwen3-MoE checkpoint with these dims holds."""
    return {n for r in build_rules(dims) for n in r.hf}
