"""FP8 emulated on CPU: quantise-dequantise with Transformer Engine's scaling semantics, so the FP8
plumbing runs in CI and FP8's effect on log-probs can be studied without a GPU.

``fp8: {fp8: e4m3 | hybrid, fp8_recipe: tensorwise | blockwise | mxfp8, emulate: true}`` makes the
actor call :func:`emulate_fp8` on its local-spec (non-TE) model: every ``ColumnParallelLinear`` /
``RowParallelLinear`` GEMM except the output layer (attention qkv/proj, dense MLP, each expert's
fc1/fc2) then computes ``y = Q_x(x) @ Q_w(W)^T`` and its backward with ``Q_g(dy)``; the router,
embedding, output layer, norms and attention softmax stay in high precision, as in Megatron + TE.
The engine side (``rollout/embedded/fp8_weights.emulate_weights_``) rounds an HF model's linear weights in place.

Recipes, as TE defines them (``transformer_engine/common/recipe/__init__.py``, TE 2.x:
``Float8CurrentScaling``, ``Float8BlockScaling``, ``MXFP8BlockScaling``):

==========  ==================  ===============  ==================  ======================================
recipe      inputs x            weights W        gradients dy        scale
==========  ==================  ===============  ==================  ======================================
tensorwise  per tensor          per tensor       per tensor          amax / fp8_max, FP32 (power of two with
                                                                     NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES=1)
blockwise   1 x 128 along K     128 x 128        1 x 128             power of two unless
                                                                     NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1
mxfp8       1 x 32 along K      1 x 32 along K   1 x 32              E8M0: 2^ceil(log2(amax / fp8_max))
==========  ==================  ===============  ==================  ======================================

Formats: ``e4m3`` = E4M3 everywhere; ``hybrid`` = E4M3 forward, E5M2 gradients (TE ``Format``;
pure E5M2 is refused by TE). ``amax_epsilon`` is 0 in every TE recipe; an all-zero block gets
scale 1 (TE: ``exp2f_rcp`` of the zero E8M0 exponent, and the same for FP32 scales). The E8M0
exponent is rounded up (TE ``ptx::float_to_e8m0``: round toward +inf), so a block's amax never
exceeds fp8_max after scaling; power-of-two FP32 scales are rounded the same way.

Where the emulation differs from TE on a GPU:

* GEMMs run in the input dtype (fp32/bf16) on dequantised values; TE accumulates FP8 products in
  FP32 with split accumulators (tensorwise fprop without), so sums differ in the last bits;
* the backward reuses the forward's row-wise quantised x and W; TE quantises the transposed
  operands column-wise from high precision for blockwise / MXFP8 (``Float8BlockScaling`` /
  ``MXFP8BlockScaling`` docstrings), so the wgrad / dgrad rounding differs;
* per-tensor amax of a sequence-parallel input is taken on the local shard (TE reduces it over
  the TP group before its FP8 all-gather);
* ``delayed`` (amax history) is not emulated (ConfigError: use tensorwise); ``fp8_wgrad: false``
  leaves all gradients unquantised (TE still runs dgrad in FP8); attention runs in high precision
  (as with TE unless ``fp8_dot_product_attention``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megatron_vespo.config.base import ConfigError

logger = logging.getLogger(__name__)

FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
EMULATED_RECIPES = ("tensorwise", "blockwise", "mxfp8")


def _scale_inv(amax: torch.Tensor, fp8_max: float, power2: bool) -> torch.Tensor:
    s = amax.float() / fp8_max
    if power2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return torch.where(amax > 0, s, torch.ones_like(s))


def fake_quant(x: torch.Tensor, fmt: str = "e4m3", block: Optional[tuple[int, int]] = None,
               power2: bool = False) -> torch.Tensor:
    """``x`` quantised to FP8 ``fmt`` and back, in ``x.dtype``.

    ``block``: None = one scale per tensor; ``(1, n)`` = groups of n along the last dim; ``(bn, bk)``
    = 2-D tiles of a matrix (edge groups / tiles may be partial). ``power2``: scales rounded up to a
    power of two (E8M0 / TE's default block scales).
    """
    dtype, fp8_max = FORMATS[fmt]
    xf = x.detach().float()
    if block is None:
        s = _scale_inv(xf.abs().amax(), fp8_max, power2)
        return ((xf / s).clamp(-fp8_max, fp8_max).to(dtype).float() * s).to(x.dtype)
    bn, bk = block
    shape = xf.shape
    m = xf.reshape(-1, shape[-1])
    n, k = m.shape
    gn, gk = -(-n // bn), -(-k // bk)
    tiles = torch.nn.functional.pad(m, (0, gk * bk - k, 0, gn * bn - n)).view(gn, bn, gk, bk)
    s = _scale_inv(tiles.abs().amax(dim=(1, 3), keepdim=True), fp8_max, power2)
    q = (tiles / s).clamp(-fp8_max, fp8_max).to(dtype).float() * s
    return q.view(gn * bn, gk * bk)[:n, :k].reshape(shape).to(x.dtype)


@dataclass(frozen=True)
class EmulatedRecipe:
    """One TE recipe's quantisers for x, W and dy (see the module table)."""

    name: str
    grad_format: Optional[str]  # None: gradients not quantised
    power2: bool
    block: int = 128  # blockwise: weight tiles block x block, activations / gradients 1 x block

    def _block(self, role: str) -> Optional[tuple[int, int]]:
        if self.name == "tensorwise":
            return None
        if self.name == "mxfp8":
            return (1, 32)
        return (self.block, self.block) if role == "w" else (1, self.block)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """Forward activations: E4M3."""
        return fake_quant(x, "e4m3", self._block("x"), self.power2)

    def quant_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Weights: E4M3."""
        return fake_quant(w, "e4m3", self._block("w"), self.power2)

    def quant_grad(self, g: torch.Tensor) -> torch.Tensor:
        """Output gradients: E5M2 (hybrid) or E4M3."""
        return g if self.grad_format is None else fake_quant(g, self.grad_format, self._block("g"), self.power2)


def recipe_for(cfg: Any, block: int = 128) -> EmulatedRecipe:
    """The emulated recipe of an ``FP8Config``; ConfigError naming the field for what is not emulated.

    ``block``: the blockwise tile (TE: 128; smaller to match a small model's rollout export)."""
    if cfg.fp8_recipe not in EMULATED_RECIPES:
        raise ConfigError(f"fp8.fp8_recipe={cfg.fp8_recipe} is not emulated on CPU (fp8.emulate=true): use one of "
                          f"{list(EMULATED_RECIPES)} (delayed scaling needs an amax history per tensor)")
    if cfg.fp8_recipe == "tensorwise":
        power2 = os.environ.get("NVTE_FP8_CURRENT_SCALING_POWER_2_SCALES", "0") == "1"
    elif cfg.fp8_recipe == "blockwise":
        power2 = os.environ.get("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "0") != "1"
    else:
        power2 = True
    grad = None if not cfg.fp8_wgrad else ("e5m2" if cfg.fp8 == "hybrid" else "e4m3")
    return EmulatedRecipe(cfg.fp8_recipe, grad, power2, block)


class _Quant(torch.autograd.Function):
    """Forward: ``fn(x)``; backward: straight through (TE updates the high-precision weights)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return g, None


class _GradQuant(torch.autograd.Function):
    """Forward: identity; backward: ``fn(dy)`` (the GEMM's dgrad and wgrad then see FP8 gradients)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable) -> torch.Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple:
        return ctx.fn(g), None


def _wrap(impl: Callable, recipe: EmulatedRecipe) -> Callable:
    def forward_impl(input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = _Quant.apply(input, recipe.quant_input)
        w = _Quant.apply(weight, recipe.quant_weight)
        return _GradQuant.apply(impl(x, w, *args, **kwargs), recipe.quant_grad)
    return forward_impl


def _bf16_layers(cfg: Any, num_layers: int) -> set[int]:
    if not cfg.first_last_layers_bf16:
        return set()
    start, end = cfg.num_layers_at_start_in_bf16, cfg.num_layers_at_end_in_bf16
    return set(range(start)) | set(range(num_layers - end, num_layers))


def emulate_fp8(model: Any, cfg: Any, block: int = 128) -> int:
    """Make the local-spec GEMMs of ``model`` (chunks or one module) compute in emulated FP8.

    No-op (returns 0) unless ``cfg.enabled and cfg.emulate``. Layers kept in BF16 by
    ``first_last_layers_bf16`` (global numbering) and the output layer are left alone; ``block``
    is the blockwise tile (TE's 128 unless a study matches a smaller rollout block). Returns
    the number of linear layers switched; ConfigError when there is none (a TE-spec model).
    """
    if cfg is None or not cfg.enabled or not getattr(cfg, "emulate", False):
        return 0
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    recipe = recipe_for(cfg, block)
    chunks = model if isinstance(model, (list, tuple)) else [model]
    count = 0
    for chunk in chunks:
        gpt = chunk
        while hasattr(gpt, "module"):
            gpt = gpt.module
        n_layers = int(gpt.config.num_layers)
        keep = _bf16_layers(cfg, n_layers)
        for name, mod in gpt.named_modules():
            if not isinstance(mod, (ColumnParallelLinear, RowParallelLinear)) or name.startswith("output_layer"):
                continue
            parts = name.split(".")
            layer = gpt.decoder.layers[int(parts[2])].layer_number - 1 if name.startswith("decoder.layers.") else None
            if layer in keep:
                continue
            if getattr(mod, "gradient_accumulation_fusion", False):
                raise ConfigError(f"fp8.emulate=true: {name} fuses gradient accumulation into main_grad, which "
                                  "the emulated (quantised copy of the) weight does not carry; emulation is for the "
                                  "CPU local spec (set gradient_accumulation_fusion=false, or use real FP8 on GPU)")
            mod._forward_impl = _wrap(mod._forward_impl, recipe)
            count += 1
    if not count:
        raise ConfigError("fp8.emulate=true found no local-spec linear layer to emulate (a Transformer Engine "
                          "model runs real FP8: set fp8.emulate=false)")
    logger.info("FP8 emulated on CPU: %s (%s gradients, %s scales) in %d linear layers", recipe.name,
                recipe.grad_format or "unquantised", "power-of-two" if recipe.power2 else "FP32", count)
    return count


_DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def emulate_activations_(model: torch.nn.Module, group: int = 128, power2: bool = False) -> int:
    """Quantise the inputs of an HF Qwen3-MoE model's linear layers per 1 x ``group`` token group (E4M3).

    What an FP8 SGLang engine does with block-FP8 weights (``activation_scheme: dynamic``:
    ``per_token_group_quant_fp8`` before each block GEMM, FP32 scales). Dense projections get a
    forward pre-hook; the fused experts (transformers 5 ``Qwen3MoeExperts``) get a forward that
    quantises both expert GEMM inputs. The router's input stays high precision, as in SGLang.
    Returns the number of modules changed.
    """
    def quant(x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, "e4m3", (1, group), power2)

    n = 0
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, torch.nn.Linear) and leaf in _DENSE:
            mod.register_forward_pre_hook(lambda m, args: (quant(args[0]), *args[1:]))
            n += 1
        elif type(mod).__name__.endswith("Experts") and hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj"):
            mod.forward = _fp8_experts_forward(mod, quant)
            n += 1
    return n


def _fp8_experts_forward(mod: Any, quant: Callable) -> Callable:
    """transformers' fused-expert loop (``Qwen3MoeExperts.forward``) with both GEMM inputs quantised."""
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if e < 0 or e >= mod.gate_up_proj.shape[0]:
                continue
            token, slot = torch.where(top_k_index == e)
            gate, up = torch.nn.functional.linear(quant(hidden_states[token]), mod.gate_up_proj[e]).chunk(2, dim=-1)
            h = torch.nn.functional.linear(quant(mod.act_fn(gate) * up), mod.down_proj[e])
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
        return out
    return forward
