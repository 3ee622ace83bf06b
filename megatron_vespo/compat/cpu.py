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
9. ``torch.cuda.synchronize()`` after batched p2p ops (``pipeline_parallel/
   p2p_communication.py:398``, pipeline parallelism) -> a no-op: CPU ops are synchronous.
10. ``torch.zeros(..., device="cuda")`` and friends in code that runs every step
   (``pipeline_parallel/schedules.py:596,983,2138``, ``transformer/moe/moe_utils.py:998``,
   ``rerun_state_machine.py:261,265``, ``distributed/param_and_grad_buffer.py:768``,
   ``utils.py:1207``) -> those modules see a ``torch`` whose tensor factories map a CUDA
   ``device=`` to CPU; every other attribute is the real ``torch``.
   Patches 8 and 10 live in ``compat/device_mode.py``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from megatron_vespo.compat.device_mode import (  # noqa: F401 - re-exported for tests and benchmarks
    _in_device_mode,
    device_mode,
    device_mode_active,
    patch_factory_devices,
    scope_device_mode,
)
from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)

_APPLIED = False
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
    scope_device_mode()
    patch_factory_devices()
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


# 9. torch.cuda.synchronize ----------------------------------------------------------------
def _patch_synchronize() -> None:
    # p2p_communication.py:398 (batch_p2p_sync) waits for the device; nothing is queued on CPU.
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
