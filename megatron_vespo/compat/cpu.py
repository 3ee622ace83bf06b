"""Make megatron-core 0.16.1 run on a CPU-only machine (gloo), for tests and small runs.

Megatron-Core assumes CUDA in a few dozen places. ``apply_cpu_compat()`` answers each of
them with the smallest change that keeps the library's own code path (so what we test on
CPU is what runs on GPU). It is an explicit call (nothing happens at import), idempotent,
and a no-op when CUDA is available. Every patch names the megatron-core 0.16.1
``file:line`` it answers (paths relative to ``megatron/core/``):

1. ``torch.cuda.current_device()`` (~50 call sites, first ``models/common/embeddings/
   rotary_pos_embedding.py:162``) -> returns ``torch.device("cpu")``.
2. CUDA RNG states in the model-parallel RNG tracker (``tensor_parallel/random.py:55,103,
   235-240``) -> states live on the CPU generator.
3. The causal mask is built on "cuda" (``transformer/utils.py:35`` and the sliding-window
   variant at ``:40``), imported by name into ``fusions/fused_softmax.py:8`` -> CPU copies
   in both modules.
4. ``te_general_gemm`` is referenced but never defined without Transformer Engine
   (``transformer/moe/moe_utils.py:1192,1225``) -> defined as None.
5. The alltoall token dispatcher creates a CUDA side stream and event
   (``transformer/moe/token_dispatcher.py:445,871-897``) -> inert stand-ins.
6. ``maybe_move_tensor_to_cpu`` (``transformer/moe/moe_utils.py:1093``) only converts the
   all-to-all split sizes to numpy for CUDA tensors -> convert CPU tensors too, because
   ``all_to_all_single`` wants lists of ints, not tensors.
7. The plain torch norm asserts ``not sequence_parallel`` (``transformer/torch_norm.py:32``)
   although RMSNorm is element-wise over the hidden dim -> build it with SP off and mark its
   params ``sequence_parallel`` so ``finalize_model_grads`` all-reduces their grads over TP
   (``distributed/finalize_model_grads.py:354``), as the TE norm does.
8. Hard-coded ``device='cuda'`` in the optimizer stack (``optimizer/optimizer.py:473,481,
   485,907``, ``optimizer/clip_grads.py:90,103,115,174,207``, ``optimizer/grad_scaler.py:15,
   88-94``, ``optimizer/distrib_optimizer.py:791,1089``), the type assertion
   ``grad.type() == 'torch.cuda.FloatTensor'`` (``optimizer/clip_grads.py:167``) and
   ``.cuda()`` in distributed checkpointing (``dist_checkpointing/exchange_utils.py:98-110,
   326-336,499``) -> a ``TorchFunctionMode`` that, for calls made from ``megatron.*`` code
   only, maps CUDA device arguments to CPU, makes ``Tensor.cuda()`` a no-op and reports CUDA
   type strings. It is entered only around the functions that need it: every function and
   method of ``megatron.core.optimizer`` but the per-step ones that allocate nothing on
   "cuda" (``_HOT_METHODS``), distributed checkpoint save/load, and the embedding
   set-up (``models/common/language_module/language_module.py:244``). A mode left on for the
   whole process would tax every torch call of the forward and backward (a Python callback
   per op: ~5% of a CPU RL loop's time in issue 15's profile).
10. ``torch.zeros(..., device="cuda")`` and friends in code that runs every step
   (``pipeline_parallel/schedules.py:596,983,2138``, ``transformer/moe/moe_utils.py:998``,
   ``rerun_state_machine.py:261,265``, ``distributed/param_and_grad_buffer.py:768``,
   ``utils.py:1207``) -> those modules see a ``torch`` whose tensor factories map a CUDA
   ``device=`` to CPU; every other attribute is the real ``torch``.
9. ``torch.cuda.synchronize()`` after batched p2p ops (``pipeline_parallel/
   p2p_communication.py:398``, pipeline parallelism) -> a no-op: CPU ops are synchronous.
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

from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)

_APPLIED = False
_MODE: "_CudaToCpuMode | None" = None
_CPU = torch.device("cpu")


def cpu_compat_active() -> bool:
    """True once ``apply_cpu_compat`` has patched megatron-core in this process."""
    return _APPLIED


def apply_cpu_compat(force: bool = False) -> bool:
    """Patch megatron-core 0.16.1 so it runs on CPU; returns True when the patches are active.

    Call it once per process before building Megatron models (it is idempotent). With CUDA
    available it does nothing and returns False, unless ``force`` (tests only).
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    require("megatron.core", "the CPU compatibility layer")
    _patch_current_device()
    _patch_rng_tracker()
    _patch_causal_masks()
    _patch_te_general_gemm()
    _patch_alltoall_streams()
    _patch_split_sizes_to_numpy()
    _patch_torch_norm_sequence_parallel()
    _scope_device_mode()
    _patch_factory_devices()
    _patch_synchronize()
    _APPLIED = True
    logger.info("megatron-core CPU compatibility patches applied")
    return True


# 1. torch.cuda.current_device ------------------------------------------------------------
def _patch_current_device() -> None:
    # models/common/embeddings/rotary_pos_embedding.py:162, transformer/moe/router.py:90-198,
    # distributed/param_and_grad_buffer.py:783-806, ... all pass the result as a device.
    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]


# 2. RNG tracker -------------------------------------------------------------------------
def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        # random.py:55 reads torch.cuda.random.get_rng_state -> the CPU generator's state.
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        # random.py:99-111 sets torch.cuda.default_generators[idx] -> the CPU generator.
        torch.set_rng_state(new_state)

    def add(self: Any, name: str, seed: int) -> None:
        # random.py:217-240: same checks, but the new state is derived on the CPU generator.
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.add = add
    # random.py:264 warns whenever the CPU state changes inside a fork; on CPU the fork *is*
    # the CPU generator, so that warning would fire on every weight init. Silence only it.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())


# 3. causal masks ------------------------------------------------------------------------
def _patch_causal_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=8)
    def causal(sq: int) -> torch.Tensor:
        # transformer/utils.py:35 builds this on "cuda"; cached because it is rebuilt per layer.
        return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()

    def sliding(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
        # transformer/utils.py:40, same construction on CPU.
        m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    for mod in (tutils, fused_softmax):  # fused_softmax.py:8 imports both by name
        mod.get_default_causal_mask = causal
        mod.get_sliding_window_causal_mask = sliding


# 4. te_general_gemm ---------------------------------------------------------------------
def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    # moe_utils.py:1192/1225 test `te_general_gemm is not None`; the name only exists when TE
    # imported (moe_utils.py:34), so without TE the router's fp32/fp64 GEMM raises NameError.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# 5. alltoall dispatcher streams ---------------------------------------------------------
class _InertEvent:
    """Stands in for a CUDA event: CPU work is already complete when recorded."""

    def synchronize(self) -> None:
        """Nothing to wait for on CPU."""

    def wait(self, stream: Any = None) -> None:
        """Nothing to wait for on CPU."""


class _InertStream:
    """Stands in for a CUDA stream on CPU, where every op runs in program order."""

    def wait_stream(self, other: Any) -> None:
        """Program order already holds."""

    def wait_event(self, event: Any) -> None:
        """Program order already holds."""

    def record_event(self, event: Any = None) -> _InertEvent:
        """Return an event that is always complete."""
        return _InertEvent()

    def synchronize(self) -> None:
        """Nothing to wait for on CPU."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _InertStream)

    def __hash__(self) -> int:
        return 0


_STREAM = _InertStream()


def _patch_alltoall_streams() -> None:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    # token_dispatcher.py:445 creates the class-level side stream only when it is None.
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _STREAM
    # token_dispatcher.py:871-874 compares against / enters torch.cuda.current_stream(), which
    # asserts without a CUDA build; torch.cuda.stream(x) is already a no-op context without CUDA.
    torch.cuda.current_stream = lambda device=None: _STREAM  # type: ignore[assignment]


# 6. split sizes -------------------------------------------------------------------------
def _patch_split_sizes_to_numpy() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        # moe_utils.py:1093 only converts CUDA tensors; all_to_all_single then receives
        # input/output split sizes as CPU tensors and fails. Convert CPU tensors as well.
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu  # imported by name


# 7. torch norm under sequence parallelism -----------------------------------------------
def _patch_torch_norm_sequence_parallel() -> None:
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    if getattr(cls, "_megatron_vespo_sp_patch", False):
        return
    original_new = cls.__new__

    def new(klass: type, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> torch.nn.Module:
        if not getattr(config, "sequence_parallel", False):
            return original_new(klass, config, hidden_size, eps, **kwargs)
        # torch_norm.py:32 asserts SP off. RMSNorm acts per token, so it is correct on a
        # sequence shard; only its weight grad must be summed over TP, which
        # finalize_model_grads.py:354 does for params carrying `sequence_parallel=True`.
        cfg = _shallow_copy_with(config, sequence_parallel=False)
        norm = original_new(klass, cfg, hidden_size, eps, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    cls.__new__ = staticmethod(new)
    cls._megatron_vespo_sp_patch = True


def _shallow_copy_with(config: Any, **changes: Any) -> Any:
    import copy

    cfg = copy.copy(config)  # not dataclasses.replace: that would re-run __post_init__ checks
    for k, v in changes.items():
        object.__setattr__(cfg, k, v)
    return cfg


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


# 9. torch.cuda.synchronize ----------------------------------------------------------------
def _patch_synchronize() -> None:
    # p2p_communication.py:398 (batch_p2p_sync) waits for the device; nothing is queued on CPU.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]


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


def _scope_device_mode() -> None:
    global _MODE
    import importlib
    import pkgutil

    import megatron.core.optimizer as mopt
    from megatron.core.models.common.language_module import language_module

    _MODE = _CudaToCpuMode()
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


def _patch_factory_devices() -> None:
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


def _enable_device_mode() -> None:
    """Enter the patch-8 mode for the rest of the process (the pre-issue-15 behaviour; benchmarks)."""
    global _MODE
    if _MODE is None:
        _MODE = _CudaToCpuMode()
    _MODE.__enter__()
