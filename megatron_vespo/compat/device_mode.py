"""CPU compat patches 8 and 10 (see ``compat/cpu.py``): megatron code that names the "cuda" device.

Patch 8: a ``TorchFunctionMode`` that, for torch calls made from ``megatron.*`` code only, maps
CUDA device arguments to CPU, makes ``Tensor.cuda()`` a no-op and reports CUDA type strings,
entered only around the functions that need it (``scope_device_mode``). Patch 10: hot-path
modules that allocate with ``device="cuda"`` see a ``torch`` whose tensor factories map it to
CPU (``patch_factory_devices``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_MODE: "_CudaToCpuMode | None" = None


def device_mode() -> "_CudaToCpuMode":
    """The patch-8 mode object (created by ``scope_device_mode``; benchmarks enter it for a whole step)."""
    global _MODE
    if _MODE is None:
        _MODE = _CudaToCpuMode()
    return _MODE


# 8. hard-coded device='cuda' ------------------------------------------------------------
_CUDA_TYPES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


def _called_from_megatron() -> bool:
    # Frame 0 is __torch_function__, frame 1 the code that called the torch API.
    frame = sys._getframe(2)
    return frame.f_globals.get("__name__", "").startswith("megatron.")


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU for torch calls made by megatron code (patch 8)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            if _called_from_megatron():
                return args[0]
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name in _CUDA_TYPES and _called_from_megatron():
                return _CUDA_TYPES[name]
            return name
        else:
            dev = kwargs.get("device")
            if dev is not None and _is_cuda_device(dev) and _called_from_megatron():
                kwargs = dict(kwargs, device=_CPU)
            elif func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]) and _called_from_megatron():
                args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_SCOPE = threading.local()


def _in_device_mode(fn: Callable) -> Callable:
    """``fn`` run inside the patch-8 mode (entered once: nested wrapped calls do not re-enter)."""
    if getattr(fn, "_megatron_vespo_device_mode", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_SCOPE, "depth", 0):
            return fn(*args, **kwargs)
        _SCOPE.depth = 1
        try:
            with _MODE:
                return fn(*args, **kwargs)
        finally:
            _SCOPE.depth = 0

    wrapper._megatron_vespo_device_mode = True  # type: ignore[attr-defined]
    return wrapper


def device_mode_active() -> bool:
    """True inside a call that runs under the patch-8 mode (tests)."""
    return bool(getattr(_SCOPE, "depth", 0))


# Optimizer methods that run every step and allocate nothing on "cuda" themselves (the clip_grads
# functions they call are scoped on their own): left unwrapped, so the torch optimizer's many
# per-parameter ops (Adam's foreach kernels) do not each pay the mode's Python callback.
_HOT_METHODS = frozenset({
    "step", "step_with_ready_grads", "prepare_grads", "zero_grad", "get_loss_scale", "scale_loss",
    "clip_grad_norm", "get_grad_norm", "count_zeros", "get_parameters", "get_main_grads_for_grad_norm",
    "_copy_model_grads_to_main_grads", "_copy_main_params_to_model_params", "_unscale_main_grads_and_check_for_nan",
    "get_grad_stats_parallel_group", "param_groups",
})


def _scope_module(mod: Any) -> dict[int, Callable]:
    """Wrap the functions and the methods of the classes *defined in* ``mod``; returns {id(old): new}."""
    swapped: dict[int, Callable] = {}
    for name, obj in list(vars(mod).items()):
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isfunction(obj):
            new = _in_device_mode(obj)
            swapped[id(obj)] = new
            setattr(mod, name, new)
        elif inspect.isclass(obj):
            for attr, member in list(vars(obj).items()):
                if isinstance(member, (staticmethod, classmethod)):
                    setattr(obj, attr, type(member)(_in_device_mode(member.__func__)))
                elif (inspect.isfunction(member) and attr not in _HOT_METHODS
                      and (not attr.startswith("__") or attr == "__init__")):
                    setattr(obj, attr, _in_device_mode(member))
    return swapped


def scope_device_mode() -> None:
    """Wrap the megatron functions that need the patch-8 mode (optimizer, dist-checkpoint, embeddings)."""
    import importlib
    import pkgutil

    import megatron.core.optimizer as mopt
    from megatron.core.models.common.language_module import language_module

    device_mode()
    swapped: dict[int, Callable] = {}
    names = [mopt.__name__] + [f"{mopt.__name__}.{m.name}" for m in pkgutil.iter_modules(mopt.__path__)
                               if not m.ispkg]
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional backends (TE, apex, emerging optimizers) may not import
            logger.debug("cpu compat: %s not importable, left as is", name)
            continue
        swapped.update(_scope_module(mod))
    try:
        from megatron.core.dist_checkpointing import serialization

        for fn in ("save", "load", "load_common_state_dict", "load_tensors_metadata", "load_sharded_metadata"):
            if hasattr(serialization, fn):
                old = getattr(serialization, fn)
                swapped[id(old)] = _in_device_mode(old)
                setattr(serialization, fn, swapped[id(old)])
    except ImportError:
        logger.debug("cpu compat: megatron.core.dist_checkpointing not importable")
    cls = language_module.LanguageModule
    cls.setup_embeddings_and_output_layer = _in_device_mode(cls.setup_embeddings_and_output_layer)
    # names imported elsewhere (`from .clip_grads import get_grad_norm_fp32`, `from megatron.core
    # import dist_checkpointing` re-exports) keep the unwrapped function: rebind them too
    for mod in list(sys.modules.values()):
        if mod is None or not getattr(mod, "__name__", "").startswith("megatron."):
            continue
        for name, obj in list(vars(mod).items()):
            new = swapped.get(id(obj))
            if new is not None and new is not obj:
                setattr(mod, name, new)


# 10. tensor factories with device="cuda" on hot paths -------------------------------------
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "as_tensor", "zeros_like", "ones_like",
              "empty_like", "full_like", "rand", "randn", "randint")


class _CpuTorch:
    """The ``torch`` module as seen by a patched megatron module: factories map a CUDA device to CPU."""

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        if name in _FACTORIES:
            real = value

            @functools.wraps(real)
            def factory(*args: Any, **kwargs: Any) -> Any:
                if _is_cuda_device(kwargs.get("device")):
                    kwargs["device"] = _CPU
                    kwargs.pop("pin_memory", None)
                return real(*args, **kwargs)
            value = factory
        setattr(self, name, value)  # cached: later lookups are plain attribute reads
        return value


def patch_factory_devices() -> None:
    """Give the hot-path megatron modules a ``torch`` whose factories map a CUDA ``device=`` to CPU."""
    import importlib

    proxy = _CpuTorch()
    for name in ("megatron.core.pipeline_parallel.schedules", "megatron.core.transformer.moe.moe_utils",
                 "megatron.core.rerun_state_machine", "megatron.core.distributed.param_and_grad_buffer",
                 "megatron.core.utils", "megatron.core.tensor_parallel.data"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy
