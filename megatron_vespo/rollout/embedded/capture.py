"""Record which experts each MoE router chose, with forward hooks on the HF router modules.

In transformers 5.x a Qwen3-MoE layer is ``Qwen3MoeSparseMoeBlock(gate=Qwen3MoeTopKRouter,
experts=Qwen3MoeExperts)``. The router computes ``softmax(x W^T)`` in float32, takes
``torch.topk(probs, top_k)`` and, when ``norm_topk_prob``, renormalises the chosen weights;
it returns ``(router_logits, router_scores, router_indices)`` and the block passes
``router_indices`` unchanged to the experts. So the hook reads the last output, the exact
expert ids the experts ran with (renormalisation changes weights, not ids). Hooking the
router, not patching it, keeps the model code untouched and costs one tensor reference per
layer per forward.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from megatron_vespo.rollout.routes import RouteSpec

logger = logging.getLogger(__name__)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers at model.model.layers")
    return layers


def _is_router(module: Any) -> bool:
    return isinstance(module, nn.Module) and hasattr(module, "top_k") and hasattr(module, "num_experts")


class RouterCapture:
    """Hooks on every MoE router of ``model``; ``collect`` returns the routes of the last forward.

    Dense layers (Qwen3 ``mlp_only_layers``) get id 0 in the wire layout, as in SGLang whose
    zero-initialised capture buffer is never written for them.
    """

    def __init__(self, model: nn.Module):
        layers = _decoder_layers(model)
        self.num_layers = len(layers)
        self.routers: dict[int, nn.Module] = {}
        for i, layer in enumerate(layers):
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if _is_router(gate):
                self.routers[i] = gate
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE router (layer.mlp.gate with top_k/num_experts): "
                             "routed-expert capture needs an MoE model")
        first = next(iter(self.routers.values()))
        self.topk = int(first.top_k)
        self.num_experts = int(first.num_experts)
        self.enabled = False
        self._seen: dict[int, torch.Tensor] = {}
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in self.routers.items()]

    @property
    def spec(self) -> RouteSpec:
        """Route shape in SGLang's wire layout (all decoder layers, MoE ones marked)."""
        return RouteSpec(num_layers=self.num_layers, topk=self.topk, num_experts=self.num_experts,
                         moe_layers=tuple(self.routers))

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self.enabled:
                return
            ids = output[-1] if isinstance(output, (tuple, list)) else output
            if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.shape[-1] != self.topk:
                raise RuntimeError(f"router of layer {layer} ({type(module).__name__}) did not return expert ids "
                                   f"[tokens, {self.topk}] as its last output; unsupported router type")
            self._seen[layer] = ids.detach()
        return hook

    def start(self) -> None:
        """Record the next forward."""
        self._seen.clear()
        self.enabled = True

    def stop(self) -> None:
        """Stop recording (the hooks stay installed but return at once)."""
        self.enabled = False
        self._seen.clear()

    def collect(self, batch: int, seq: int) -> torch.Tensor:
        """[batch, seq, num_layers, topk] int32 routes of the forward since ``start``."""
        missing = [i for i in self.routers if i not in self._seen]
        if missing:
            raise RuntimeError(f"routers of layers {missing} did not run in the last forward")
        out = torch.zeros(batch, seq, self.num_layers, self.topk, dtype=torch.int32)
        for i, ids in self._seen.items():
            out[:, :, i] = ids.reshape(batch, seq, self.topk).to(torch.int32)
        self._seen.clear()
        return out

    def remove(self) -> None:
        """Uninstall the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def route_capture_or_none(model: nn.Module) -> Optional[RouterCapture]:
    """A ``RouterCapture`` for MoE models, None (logged) for dense ones."""
    try:
        return RouterCapture(model)
    except ValueError as exc:
        logger.info("routed-expert capture unavailable: %s", exc)
        return None
