"""Block-wise FP8 weights for an FP8 rollout engine (SGLang's DeepSeek-V3 / Qwen3-FP8 checkpoint layout).

::

    q, s = quantize_blockwise(w)                    # w [N, K] -> float8_e4m3fn [N, K], float32 [N/128, K/128]
    w ~= dequantize_blockwise(q, s)                 # w[i, j] ~= q[i, j] * s[i // 128, j // 128]
    quantize_named_tensors([(hf_name, w), ...])     # a bucket of HF tensors -> its FP8 form (the weight-sync hook)
    quantization_config((128, 128))                 # the config.json entry
    check_block_layout(dims, (128, 128), tp_size=4) # SGLang's per-TP-rank divisibility rules, before any export

Layout, as SGLang loads it (sglang ``python/sglang/srt/layers/quantization/fp8.py`` at commit
00563d36, ``Fp8Config.from_config`` / ``Fp8LinearMethod.create_fp8_weight_`` /
``Fp8MoEMethod.create_fp8_moe_weight_``; ``models/qwen3_moe.py`` at 008af3a6, ``load_weights``):

* ``config.json`` ``quantization_config``: ``quant_method: fp8`` (-> checkpoint is FP8-serialized),
  ``activation_scheme: dynamic`` (block quantisation accepts only dynamic), ``weight_block_size:
  [block_n, block_k]`` and ``fmt: e4m3`` (what Qwen's and DeepSeek's FP8 releases carry);
* every quantised linear ``<module>.weight`` is ``float8_e4m3fn`` [N, K] with a sibling
  ``<module>.weight_scale_inv`` float32 [ceil(N / block_n), ceil(K / block_k)]: the *dequantisation
  multiplier* per block (``w = q * scale_inv``, despite the name). Qwen3-MoE's loader renames
  ``q/k/v_proj`` -> ``qkv_proj`` and ``experts.{e}.{gate,up,down}_proj`` -> ``experts.w13_/w2_``
  for the scale exactly as for the weight, so per-expert HF names are what we write;
* high precision (``--dtype``, default bfloat16): norms, ``mlp.gate`` (the router: SGLang builds it
  as an unquantised ``ReplicatedLinear`` on the FP8 path and would load an FP8 tensor into a
  bf16 parameter without its scale), ``embed_tokens`` and ``lm_head`` (not ``LinearBase``, so
  ``Fp8Config.get_quant_method`` leaves them unquantised).

Scale per block = amax / 448 (E4M3's largest finite value) in float32, the FP32-scale variant of
Transformer Engine's ``Float8BlockScaling`` (``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1``, see
docs/fp8.md); an all-zero block gets scale 1. Values are clamped to +-448 before the cast
(torch's cast does not saturate: it would give NaN).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch

from megatron_vespo.config.base import ConfigError

E4M3_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"

#: HF weights of Qwen3-MoE that an FP8 engine serves quantised (``LinearBase`` / ``FusedMoE`` modules)
_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight")


def is_quantized_linear(name: str) -> bool:
    """True for the HF tensors exported as FP8 (attention, dense-MLP and expert projections)."""
    return _LINEAR.fullmatch(name) is not None


def scale_name(weight_name: str) -> str:
    """``...q_proj.weight`` -> ``...q_proj.weight_scale_inv``."""
    return weight_name + SCALE_SUFFIX


def _block(block: Sequence[int]) -> tuple[int, int]:
    b = tuple(int(x) for x in block)
    if len(b) != 2 or min(b) < 1:
        raise ValueError(f"FP8 weight block must be two positive ints [block_n, block_k], got {list(block)}")
    return b  # type: ignore[return-value]


def quantize_blockwise(w: torch.Tensor, block: Sequence[int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [N, K] -> (float8_e4m3fn [N, K], float32 ``scale_inv`` [ceil(N/bn), ceil(K/bk)]).

    Partial edge blocks are scaled by their own amax (SGLang sizes the scale grid with ceil).
    """
    if w.dim() != 2:
        raise ValueError(f"block-wise FP8 needs a 2-D weight, got shape {list(w.shape)}")
    bn, bk = _block(block)
    n, k = w.shape
    gn, gk = -(-n // bn), -(-k // bk)
    x = w.detach().float()
    padded = torch.nn.functional.pad(x, (0, gk * bk - k, 0, gn * bn - n))
    tiles = padded.view(gn, bn, gk, bk)
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    q = q.view(gn * bn, gk * bk)[:n, :k].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.contiguous()


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, block: Optional[Sequence[int]] = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``q * scale_inv`` broadcast over blocks, as ``dtype``.

    ``block`` defaults to what the grid implies for full blocks (``N / grid_rows``); pass it when
    edge blocks are partial.
    """
    n, k = q.shape
    gn, gk = scale_inv.shape
    if block is None:
        if n % gn or k % gk:
            raise ValueError(f"weight {list(q.shape)} is not a whole number of blocks of the scale grid "
                             f"{list(scale_inv.shape)}; pass block=")
        block = (n // gn, k // gk)
    bn, bk = _block(block)
    if (-(-n // bn), -(-k // bk)) != (gn, gk):
        raise ValueError(f"scale grid {list(scale_inv.shape)} does not match weight {list(q.shape)} with block "
                         f"{[bn, bk]}")
    s = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (q.float() * s).to(dtype)


def quantization_config(block: Sequence[int] = DEFAULT_BLOCK) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` for block FP8 (SGLang ``Fp8Config.from_config`` keys)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(_block(block))}


def quantize_named_tensors(named: Iterable[tuple[str, torch.Tensor]], block: Sequence[int] = DEFAULT_BLOCK,
                           dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, torch.Tensor]]:
    """A bucket of HF-named tensors -> its FP8 form.

    Linear weights become ``(name, float8_e4m3fn)`` followed directly by ``(name_scale_inv,
    float32)``; everything else (norms, router, embeddings, lm_head) is cast to ``dtype``.
    """
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in named:
        if is_quantized_linear(name):
            q, s = quantize_blockwise(t, block)
            out.extend(((name, q), (scale_name(name), s)))
        else:
            out.append((name, t.to(dtype)))
    return out


def dequantize_named_tensors(named: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype = torch.float32,
                             block: Optional[Sequence[int]] = None) -> list[tuple[str, torch.Tensor]]:
    """Fold every ``(w, w_scale_inv)`` pair back into one high-precision tensor (CPU engines, tests).

    ``block`` is needed when edge blocks are partial (default: implied by each scale grid).
    Pairs must be complete within ``named``; ValueError names an FP8 weight without its scale or a
    scale without its weight. Tensors that are not FP8 pass through unchanged.
    """
    scales = {n[: -len(SCALE_SUFFIX)]: t for n, t in named if n.endswith(SCALE_SUFFIX)}
    weights = {n for n, t in named if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}
    orphan = sorted(set(scales) - weights)
    if orphan:
        raise ValueError(f"{scale_name(orphan[0])}: scale without its FP8 weight {orphan[0]} in the same bucket")
    unscaled = sorted(weights - set(scales))
    if unscaled:
        raise ValueError(f"{unscaled[0]}: FP8 weight without its {scale_name(unscaled[0])} in the same bucket")
    out = []
    for n, t in named:
        if n.endswith(SCALE_SUFFIX):
            continue
        out.append((n, dequantize_blockwise(t, scales[n], block, dtype=dtype) if n in weights else t))
    return out


@dataclass(frozen=True)
class BlockFP8Format:
    """Export format "block FP8": what ``iter_hf_weights(dtype=...)`` / ``save_hf_checkpoint`` accept
    in place of a torch dtype. ``dtype`` is the precision of the tensors kept high precision
    (None: the caller's default)."""

    block: tuple = DEFAULT_BLOCK
    dtype: Optional[torch.dtype] = None

    def config(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""
        return quantization_config(self.block)

    def groups(self, named: Sequence[tuple[str, torch.Tensor]],
               default_dtype: torch.dtype) -> list[tuple[int, list[tuple[str, torch.Tensor]]]]:
        """``[(bytes, [(name, tensor), ...])]``: each FP8 weight grouped with its scale (they must
        travel in the same bucket), every other tensor alone, cast to ``dtype or default_dtype``."""
        out = []
        for name, t in named:
            group = quantize_named_tensors([(name, t)], self.block, self.dtype or default_dtype)
            out.append((sum(x.numel() * x.element_size() for _, x in group), group))
        return out


def as_block_fp8(dtype: Any) -> Optional[BlockFP8Format]:
    """``"fp8"`` or a ``BlockFP8Format`` -> the format; any other dtype spec -> None."""
    if isinstance(dtype, BlockFP8Format):
        return dtype
    if isinstance(dtype, str) and dtype == "fp8":
        return BlockFP8Format()
    return None


# ----------------------------------------------------------------------------- engine layout check
def block_layout_problems(dims: Any, block: Sequence[int] = DEFAULT_BLOCK, tp_size: int = 1,
                          ep_size: int = 1) -> list[str]:
    """Sharded dimensions an SGLang engine with ``--tp-size tp_size --ep-size ep_size`` refuses.

    SGLang's rules (``validate_block_quant_shapes``, ``create_fp8_moe_weight_``): every output
    partition of a column-parallel or merged (qkv, gate_up) linear is a multiple of block_n, the
    input partition of a row-parallel linear at TP > 1 a multiple of block_k; experts are split
    over moe-TP = tp / ep. ``dims`` is ``Qwen3MoeDims`` or an HF config.
    """
    from megatron_vespo.models.dims import as_dims

    d = as_dims(dims)
    bn, bk = _block(block)
    tp, ep = int(tp_size), int(ep_size)
    if tp < 1 or ep < 1 or tp % ep:
        return [f"engine tp_size={tp} / ep_size={ep}: ep must divide tp"]
    q = d.num_attention_heads * d.head_dim // tp
    kv = max(1, d.num_key_value_heads // tp) * d.head_dim  # KV heads are replicated when tp > kv heads
    checks = [(f"num_attention_heads * head_dim / tp = {d.num_attention_heads} * {d.head_dim} / {tp}", q, bn),
              (f"num_key_value_heads * head_dim / tp = max(1, {d.num_key_value_heads} / {tp}) * {d.head_dim}",
               kv, bn)]
    if tp > 1:
        checks.append((f"o_proj input num_attention_heads * head_dim / tp = {d.num_attention_heads} * "
                       f"{d.head_dim} / {tp}", q, bk))
    if len(d.moe_layers) < d.num_layers:  # dense MLP layers (mlp_only_layers)
        checks.append((f"intermediate_size / tp = {d.intermediate_size} / {tp}", d.intermediate_size // tp, bn))
        if tp > 1:
            checks.append((f"down_proj input intermediate_size / tp = {d.intermediate_size} / {tp}",
                           d.intermediate_size // tp, bk))
    if d.moe_layers:
        mtp = tp // ep
        checks.append((f"moe_intermediate_size / moe_tp = {d.moe_intermediate_size} / {mtp} (tp {tp} / ep {ep})",
                       d.moe_intermediate_size // mtp, bn))
        if mtp > 1:
            checks.append((f"down_proj input moe_intermediate_size / moe_tp = {d.moe_intermediate_size} / {mtp}",
                           d.moe_intermediate_size // mtp, bk))
    return [f"{what} = {value} is not a multiple of {b}" for what, value, b in checks if value % b]


def check_block_layout(dims: Any, block: Sequence[int] = DEFAULT_BLOCK, tp_size: int = 1, ep_size: int = 1,
                       field: str = "weight_sync.dtype=fp8") -> None:
    """Raise ConfigError naming ``field`` and the model dimension when an FP8 engine of this layout
    would refuse the block-quantised weights (see :func:`block_layout_problems`)."""
    problems = block_layout_problems(dims, block, tp_size, ep_size)
    if not problems:
        return
    hint = ""
    d_moe = any("moe_intermediate" in p for p in problems)
    if d_moe and tp_size > 1:
        hint = (f"; with expert parallelism in the engine (--ep-size {tp_size}) experts stay whole on each rank, or "
                "pick an engine TP size that keeps every shard a multiple of the block")
    raise ConfigError(f"{field}: an FP8 rollout engine with tp_size={tp_size}, ep_size={ep_size} and weight block "
                      f"{list(_block(block))} cannot load these weights: {'; '.join(problems)} (SGLang's FP8 "
                      f"loader refuses partitions that are not whole blocks){hint}")
