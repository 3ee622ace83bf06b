"""The dependency versions this code was written and tested against, checked at start-up.

Why each range (keep in sync with ``setup.py``):

* ``megatron-core >=0.16.1,<0.17``: ``compat/cpu.py`` patches megatron-core 0.16.1 internals
  by file and line, and the actor builds 0.16.1's ``TransformerConfig`` / ``OptimizerConfig``
  fields (0.17+ needs Python >= 3.12 and was not tested; 0.19 already changed
  ``qk_layernorm`` handling).
* ``transformers >=5.0,<6``: routed-expert capture in the embedded engine hooks
  ``Qwen3MoeTopKRouter`` (``models/qwen3_moe/modeling_qwen3_moe.py``), the router module
  transformers 5 introduced; in 4.x the gate is a plain ``nn.Linear`` without ``top_k``, and
  ``rope_parameters`` replaced ``rope_theta``. SGLang 0.5.23 pins ``transformers==5.19.0``, inside
  this range, so trainer and engine can share one environment.

``check_versions()`` raises :class:`UnsupportedVersionError` naming the package, the installed
version and the supported range. Set ``MEGATRON_VESPO_SKIP_VERSION_CHECK=1`` to run anyway
(at your own risk: a mismatch fails later with a less clear error).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
from typing import Iterable, Optional

logger = logging.getLogger(__name__)

#: distribution -> (minimum inclusive, maximum exclusive, importable module)
SUPPORTED: dict[str, tuple[str, str, str]] = {
    "megatron-core": ("0.16.1", "0.17", "megatron.core"),
    "transformers": ("5.0", "6", "transformers"),
}

SKIP_ENV = "MEGATRON_VESPO_SKIP_VERSION_CHECK"


class UnsupportedVersionError(ImportError):
    """An installed dependency is outside the range this code supports."""


def parse_version(text: str) -> tuple[int, ...]:
    """Leading numeric release components of a version string: ``"0.16.1rc2"`` -> (0, 16, 1)."""
    parts = []
    for piece in text.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):  # "1rc2": pre-release marker ends the release part
            break
    if not parts:
        raise ValueError(f"cannot parse version {text!r}")
    return tuple(parts)


def supported_range(dist: str) -> str:
    """The pip specifier of ``dist``'s supported range, e.g. ``megatron-core>=0.16.1,<0.17``."""
    lo, hi, _ = SUPPORTED[dist]
    return f"{dist}>={lo},<{hi}"


def installed_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_range(version: str, dist: str) -> bool:
    """True when ``version`` of ``dist`` lies in its supported range."""
    lo, hi, _ = SUPPORTED[dist]
    v = parse_version(version)
    return parse_version(lo) <= v < parse_version(hi)


def check_versions(dists: Optional[Iterable[str]] = None) -> dict[str, Optional[str]]:
    """Raise UnsupportedVersionError if an installed package of ``dists`` is outside its range.

    Packages that are not installed pass (their features fail later with an install hint);
    returns ``{dist: installed version or None}``.
    """
    found: dict[str, Optional[str]] = {}
    bad = []
    for dist in dists or SUPPORTED:
        version = installed_version(dist)
        found[dist] = version
        if version is not None and not in_range(version, dist):
            bad.append(f"{dist} {version} is installed but megatron_vespo supports {supported_range(dist)} "
                       f"(pip install '{supported_range(dist)}')")
    if bad:
        if os.environ.get(SKIP_ENV) == "1":
            logger.warning("%s=1: running with unsupported versions: %s", SKIP_ENV, "; ".join(bad))
        else:
            raise UnsupportedVersionError("; ".join(bad) + f". Set {SKIP_ENV}=1 to run anyway.")
    return found


def broken_installs(dists: Optional[Iterable[str]] = None) -> dict[str, str]:
    """``{dist: import error}`` for packages that are installed but whose module does not import.

    An absent package is not broken (tests that need it skip); an installed one that fails to
    import must fail the test run, not silently skip every test that needs it.
    """
    broken = {}
    for dist in dists or SUPPORTED:
        module = SUPPORTED[dist][2]
        if installed_version(dist) is None and importlib.util.find_spec(module.split(".")[0]) is None:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure of an installed package counts
            broken[dist] = f"{type(exc).__name__}: {exc}"
    return broken
