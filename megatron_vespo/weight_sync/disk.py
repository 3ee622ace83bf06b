"""Weight sync through the file system: the path that always works (SGLang and embedded engines).

Every training rank calls :meth:`DiskWeightSync.push` (the export is collective: shards are
gathered over TP/EP/PP); rank 0 writes ``<root>/v<version>`` as a Hugging Face directory
(``checkpoint.hf_dir.save_hf_checkpoint``, atomic) and tells every engine to load it with
``/update_weights_from_disk`` tagged with the policy version. Older version directories are
removed once no engine serves them. NCCL broadcast (``update_weights_from_distributed``) and
CUDA-IPC (``update_weights_from_tensor``) are faster on GPU clusters; this path needs only a
file system both sides see (a shared one on multi-node clusters).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import torch

logger = logging.getLogger(__name__)


def version_dir(root: str | Path, version: int) -> Path:
    """Directory holding the HF export of ``version``."""
    return Path(root) / f"v{int(version):06d}"


class DiskWeightSync:
    """Export the actor's weights as HF safetensors and make the engines load them.

    Args:
        root: directory for the exported versions (on a file system the engines can read).
        hf_cfg: the model's Hugging Face config (written as config.json).
        source_dir: HF base model directory whose tokenizer files are copied along (optional).
        dtype: export dtype (default: the model's).
        keep_last: how many exported versions to keep on disk.
    """

    def __init__(self, root: str | Path, hf_cfg: Any, *, source_dir: Optional[str] = None,
                 dtype: Optional[str] = None, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root, self.hf_cfg, self.source_dir = Path(root), hf_cfg, source_dir
        self.dtype, self.keep_last = dtype, keep_last

    def export(self, model: Any, version: int) -> Path:
        """Collective: write ``version``'s HF directory (rank 0 writes) and return its path."""
        from megatron_vespo.checkpoint.hf_dir import save_hf_checkpoint

        out = version_dir(self.root, version)
        if out.exists():  # a resumed run re-exporting a version it already wrote
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                shutil.rmtree(out)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        return save_hf_checkpoint(model, self.hf_cfg, out, source_dir=self.source_dir, dtype=self.dtype)

    def push(self, model: Any, version: int, load: Optional[Callable[[str, int], Awaitable[Any]]] = None,
             run: Optional[Callable[[Awaitable[Any]], Any]] = None) -> dict[str, float]:
        """Export ``version`` and, on rank 0, await ``load(path, version)`` (the engines' update call).

        ``run`` executes the awaitable (the loop's event loop); returns timing metrics.
        """
        t0 = time.perf_counter()
        path = self.export(model, version)
        t1 = time.perf_counter()
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        error: Optional[BaseException] = None
        if rank0 and load is not None:
            try:
                if run is None:
                    raise ValueError("push(load=...) needs run= to execute the engines' update call")
                run(load(str(path), version))
                self.rotate(version)
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                error = exc
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # the other ranks would otherwise carry on into the next step's collectives alone
            box = [None if error is None else f"{type(error).__name__}: {error}"]
            torch.distributed.broadcast_object_list(box, src=0)
            if box[0] is not None and error is None:
                raise RuntimeError(f"weight sync from disk failed on rank 0: {box[0]}")
        if error is not None:
            raise error
        t2 = time.perf_counter()
        return {"weight_sync/export_s": t1 - t0, "weight_sync/load_s": t2 - t1}

    def rotate(self, current: int) -> None:
        """Rank 0, once the engines serve ``current``: remove versions ``<= current - keep_last``.

        Never the one the engines load: it is called after that load returned, and the async loop's
        background load (``orchestration/weight_load.py``) calls it itself, after its own load, and
        is joined before the next export, so no rotation runs while a newer load is in progress.
        """
        versions = sorted(int(p.name[1:]) for p in self.root.glob("v*") if p.name[1:].isdigit())
        for v in versions:
            if v <= current - self.keep_last:
                shutil.rmtree(version_dir(self.root, v), ignore_errors=True)
