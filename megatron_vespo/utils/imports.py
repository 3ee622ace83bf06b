"""Guarded imports for optional heavy dependencies.

Each optional dependency lives behind a pip extra. Importing a module that needs
one raises an ``ImportError`` that names the extra to install, in the style of
megatron-core's ``HAVE_TE`` guards.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: module name -> the pip command that provides it
INSTALL_HINTS = {
    "megatron": "pip install 'megatron_vespo[megatron]'  (megatron-core>=0.16.1,<0.17)",
    "megatron.core": "pip install 'megatron_vespo[megatron]'  (megatron-core>=0.16.1,<0.17)",
    "transformers": "pip install 'megatron_vespo[megatron]'  (transformers>=5.0,<6)",
    "safetensors": "pip install 'megatron_vespo[megatron]'  (safetensors)",
    "transformer_engine": "pip install 'megatron_vespo[fp8]'  (needs CUDA + cuDNN)",
    "sglang": "pip install 'megatron_vespo[sglang]'  (needs CUDA GPUs)",
    "ray": "pip install 'megatron_vespo[ray]'",
    "wandb": "pip install 'megatron_vespo[wandb]'",
    "fastapi": "pip install 'megatron_vespo[serve]'",
    "uvicorn": "pip install 'megatron_vespo[serve]'",
    "httpx": "pip install 'megatron_vespo[serve]'",
    "apex": "pip install 'megatron_vespo[apex]'  (build from NVIDIA/apex for fused kernels)",
    "math_verify": "pip install 'math-verify>=0.7'  (in megatron_vespo[cpu])",
}


def require(module: str, feature: str = "") -> ModuleType:
    """Import ``module`` or raise an ImportError naming the extra that provides it.

    Args:
        module: dotted module name, e.g. ``"megatron.core"``.
        feature: what the caller wanted to do, used in the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised by tests via monkeypatch
        root = module.split(".")[0]
        hint = INSTALL_HINTS.get(module) or INSTALL_HINTS.get(root, f"pip install {root}")
        what = f" for {feature}" if feature else ""
        raise ImportError(f"'{module}' is required{what} but could not be imported ({exc}). "
                          f"Install it with: {hint}") from exc


def is_available(module: str) -> bool:
    """Return True when ``module`` imports cleanly (any exception counts as unavailable)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - TE raises OSError/RuntimeError without CUDA, not ImportError
        return False
    return True
