"""Can this machine run the configured FP8 recipe? Checked before any model is built.

``check_fp8_environment(cfg, env)`` raises ``ConfigError`` naming the ``fp8.*`` field when the
GPU generation, CUDA or Transformer Engine version cannot run ``cfg``; ``env`` is an
``FP8Environment`` (default: ``FP8Environment.detect()`` reads the real machine), so every rule
is testable on a CPU machine by passing the environment in.

Rules (where each comes from):

=============  ==================  ===============  =================================================
recipe         compute capability  TE minimum       source
=============  ==================  ===============  =================================================
delayed        >= 8.9              1.11.0           TE ``check_fp8_support``; megatron-core
                                                    ``transformer_config.py:1599-1611`` (MoE FP8 and
                                                    FP8 grouped GEMM)
tensorwise     >= 8.9              2.2.0.dev0       ``fp8_utils.get_fp8_recipe`` (Float8CurrentScaling)
blockwise      >= 9.0, CUDA 12.9   2.3.0.dev0       TE ``check_fp8_block_scaling_support``;
               (>= 10.0: TE 2.9)                    Blackwell support added in TE v2.9 (#2157)
mxfp8          10.0 <= cc < 12.0   2.1.0            TE ``check_mxfp8_support`` (sm120 unsupported)
=============  ==================  ===============  =================================================

Plus: Ada (8.9) needs CUDA >= 12.1; ``fp8_param_gather`` with ``mxfp8`` needs TE >= 2.2
(megatron-core ``fp8_utils`` re-quantises non-per-tensor FP8 parameters only from TE 2.2);
``blockwise`` on Blackwell is emulated with MXFP8 and needs power-of-two scales, so
``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1`` is an error there.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from megatron_vespo.config.base import ConfigError
from megatron_vespo.fp8.config import FP8Config
from megatron_vespo.utils.imports import INSTALL_HINTS

logger = logging.getLogger(__name__)

FP32_SCALES_ENV = "NVTE_FP8_BLOCK_SCALING_FP32_SCALES"


@dataclass(frozen=True)
class RecipeRequirement:
    """Hardware / library floor of one recipe (see the module table)."""

    min_capability: tuple[int, int]
    max_capability: Optional[tuple[int, int]]  # exclusive upper bound
    min_te: str
    min_cuda: Optional[str]
    hardware: str


REQUIREMENTS: dict[str, RecipeRequirement] = {
    "delayed": RecipeRequirement((8, 9), None, "1.11.0", None, "an Ada, Hopper or Blackwell GPU"),
    "tensorwise": RecipeRequirement((8, 9), None, "2.2.0.dev0", None, "an Ada, Hopper or Blackwell GPU"),
    "blockwise": RecipeRequirement((9, 0), None, "2.3.0.dev0", "12.9", "a Hopper or Blackwell GPU"),
    "mxfp8": RecipeRequirement((10, 0), (12, 0), "2.1.0", None, "a Blackwell GPU"),
}
#: TE release that runs ``blockwise`` on Blackwell (MXFP8 emulation)
BLOCKWISE_BLACKWELL_TE = "2.9.0"
#: TE release from which megatron-core re-quantises MXFP8 parameters (fp8_param_gather)
MXFP8_PARAM_GATHER_TE = "2.2.0"


@dataclass(frozen=True)
class FP8Environment:
    """What the FP8 checks look at; ``detect()`` reads it from this machine."""

    cuda_available: bool
    capability: Optional[tuple[int, int]] = None  # (major, minor) of the current CUDA device
    cuda_version: Optional[str] = None  # torch.version.cuda
    te_version: Optional[str] = None  # None: transformer_engine cannot be imported
    te_error: str = ""  # why it cannot
    block_scaling_fp32_scales: bool = False  # NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1
    device_name: str = ""

    @classmethod
    def detect(cls) -> "FP8Environment":
        """The real machine: CUDA device, torch's CUDA version, Transformer Engine (imported)."""
        cuda = torch.cuda.is_available()
        cap = tuple(torch.cuda.get_device_capability()) if cuda else None
        name = torch.cuda.get_device_name() if cuda else ""
        te_version, te_error = None, ""
        try:
            te = importlib.import_module("transformer_engine")
            te_version = str(getattr(te, "__version__", "") or _dist_version("transformer-engine"))
        except Exception as exc:  # noqa: BLE001 - TE raises OSError/RuntimeError without CUDA libs
            te_error = f"{type(exc).__name__}: {exc}"
        return cls(cuda_available=cuda, capability=cap, cuda_version=torch.version.cuda, te_version=te_version,
                   te_error=te_error, block_scaling_fp32_scales=os.environ.get(FP32_SCALES_ENV, "0") == "1",
                   device_name=name)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (for run records)."""
        d = asdict(self)
        d["capability"] = None if self.capability is None else f"{self.capability[0]}.{self.capability[1]}"
        return d


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "0"


def _version(v: str) -> Any:
    from packaging.version import Version

    return Version(v)


def _cap(c: tuple[int, int]) -> str:
    return f"{c[0]}.{c[1]}"


def check_fp8_environment(cfg: FP8Config, env: Optional[FP8Environment] = None) -> Optional[FP8Environment]:
    """Raise ConfigError naming the ``fp8.*`` field when this machine cannot run ``cfg``.

    Returns the environment checked (None when FP8 is off: nothing to check). Advisory notes
    (``fp8_advisories``) are logged as warnings.
    """
    if not cfg.enabled:
        return None
    env = env or FP8Environment.detect()
    what = f"fp8.fp8={cfg.fp8}"
    if not env.cuda_available or env.capability is None:
        raise ConfigError(f"{what} needs a CUDA GPU (Transformer Engine FP8 GEMMs); none is available here. "
                          "Set fp8.fp8: null to train without FP8")
    if env.te_version is None:
        raise ConfigError(f"{what} needs Transformer Engine, which cannot be imported ({env.te_error or 'not found'}). "
                          f"Install it with: {INSTALL_HINTS['transformer_engine']}")
    recipe = cfg.fp8_recipe
    req = REQUIREMENTS[recipe]
    field = f"fp8.fp8_recipe={recipe}"
    cap = tuple(env.capability)
    if cap < req.min_capability:
        raise ConfigError(f"{field} needs {req.hardware} (compute capability >= {_cap(req.min_capability)}); "
                          f"found {_cap(cap)}{_named(env)}")
    if req.max_capability is not None and cap >= req.max_capability:
        raise ConfigError(f"{field} is not supported by Transformer Engine on compute capability {_cap(cap)}"
                          f"{_named(env)} (needs {_cap(req.min_capability)} <= capability < "
                          f"{_cap(req.max_capability)}); use fp8.fp8_recipe=tensorwise or blockwise")
    te = _version(env.te_version)
    min_te = req.min_te
    if recipe == "blockwise" and cap >= (10, 0):
        min_te = BLOCKWISE_BLACKWELL_TE
    if te < _version(min_te):
        raise ConfigError(f"{field} on compute capability {_cap(cap)} needs transformer-engine >= {min_te}; "
                          f"found {env.te_version}")
    if cfg.fp8_param_gather and recipe == "mxfp8" and te < _version(MXFP8_PARAM_GATHER_TE):
        raise ConfigError(f"fp8.fp8_param_gather=true with {field} needs transformer-engine >= "
                          f"{MXFP8_PARAM_GATHER_TE}; found {env.te_version}")
    min_cuda = req.min_cuda or ("12.1" if cap < (9, 0) else None)
    if min_cuda is not None and (env.cuda_version is None or _version(env.cuda_version) < _version(min_cuda)):
        raise ConfigError(f"{field} on compute capability {_cap(cap)} needs CUDA >= {min_cuda} "
                          f"(torch.version.cuda); found {env.cuda_version}")
    if recipe == "blockwise" and cap >= (10, 0) and env.block_scaling_fp32_scales:
        raise ConfigError(f"{field} on compute capability {_cap(cap)} runs as MXFP8 emulation, which needs "
                          f"power-of-two scales: unset {FP32_SCALES_ENV} (found 1) or use fp8.fp8_recipe=mxfp8")
    for note in fp8_advisories(cfg, env):
        logger.warning("%s", note)
    return env


def _named(env: FP8Environment) -> str:
    return f" ({env.device_name})" if env.device_name else ""


def fp8_advisories(cfg: FP8Config, env: FP8Environment) -> list[str]:
    """Legal but questionable choices for RL on this machine (logged, not raised)."""
    notes = []
    if not cfg.enabled:
        return notes
    cap = tuple(env.capability or (0, 0))
    if cfg.fp8_recipe == "delayed":
        notes.append(f"fp8.fp8_recipe=delayed scales each tensor from the amax of up to "
                     f"{cfg.fp8_amax_history_len} past steps; RL weights move every update, so tensorwise, "
                     "blockwise (Hopper) or mxfp8 (Blackwell), which scale from the current tensor, are the "
                     "usual choice (slime, verl)")
    if cfg.fp8_recipe == "blockwise" and (9, 0) <= cap < (10, 0) and not env.block_scaling_fp32_scales:
        notes.append(f"fp8.fp8_recipe=blockwise with power-of-two scales: an FP8 rollout engine serving "
                     f"block-quantised weights uses FP32 scales; set {FP32_SCALES_ENV}=1 in the trainer's "
                     "environment (before Transformer Engine is imported) to quantise the same way")
    if cfg.fp8_recipe == "blockwise" and cap >= (10, 0):
        notes.append("fp8.fp8_recipe=blockwise on Blackwell is emulated with MXFP8; fp8.fp8_recipe=mxfp8 is "
                     "the native recipe there")
    return notes
