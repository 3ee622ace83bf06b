"""Reading checkpoints from strangers, and writing them onto disks that fill up.

* :func:`safe_torch_load`: ``torch.load(weights_only=True)``; a pickle that names anything but
  tensors and plain data is refused (a checkpoint from someone else must not run code).
* :func:`explain_disk_full`: turns ENOSPC, or torch's zip writer's short write
  (``unexpected pos 704 vs 598``), into a :class:`DiskFullError` naming the directory and its
  free space.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch


def _numpy_safe_globals() -> list:
    """What a numpy array in a pickle needs (RNG files of checkpoints written before keys were tensors)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only; ValueError names the file otherwise.

    A training checkpoint may come from someone else; ``weights_only=False`` would run whatever
    code its pickle names. Numpy arrays (old RNG files) are the only extra type allowed.
    """
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise ValueError(f"{path}: refused to load: it holds objects other than tensors and plain data "
                         f"({first or type(exc).__name__}); a checkpoint must not run code when loaded") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: not a readable torch file ({type(exc).__name__}: {str(exc)[:200]}); "
                         "the checkpoint is corrupt or truncated") from exc


class DiskFullError(OSError):
    """A checkpoint or export ran out of disk space (the message names the directory and the free space)."""


_DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
#: what torch.save's zip writer says when a write came up short (no errno reaches Python)
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "No space left on device", "file write failed")


def explain_disk_full(exc: BaseException, where: str | os.PathLike, what: str, after: str = "") -> Optional[OSError]:
    """A ``DiskFullError`` naming ``where`` and its free space if ``exc`` is a full disk, else None.

    ``exc`` counts as a full disk when its chain holds ENOSPC/EDQUOT, or when torch's writer
    reports a short write (``unexpected pos 704 vs 598``) and the filesystem is (nearly) full.
    """
    chain, cur = [], exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    by_errno = any(isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS for e in chain)
    where = Path(where)
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    short = any(any(m in str(e) for m in _SHORT_WRITE) for e in chain) and free < 64 * 2**20
    if not (by_errno or short):
        return None
    return DiskFullError(errno.ENOSPC, f"disk full while {what}: no space left on the filesystem holding {where} "
                                       f"({free} bytes free); free space there or choose another directory. "
                                       f"The incomplete files were removed{'; ' + after if after else ''}")
