"""``weight_sync.kind`` -> the object the RL loop calls after each training step.

Every kind has the same three calls, all collective over the training ranks (``engines`` is the
loop's ``RolloutEngines`` on rank 0 and None elsewhere):

* ``export(model, version) -> Path``: an HF directory the engines can start from (disk);
* ``update(model, version, engines) -> metrics``: put ``version``'s weights into the engines;
* ``close(engines)``: release what ``update`` set up (the broadcast group).

``disk`` writes every version as safetensors and calls ``/update_weights_from_disk`` (always
works; needs a file system both sides see). ``distributed`` broadcasts from training rank 0
over a process group with the engines (NCCL on GPU clusters, gloo on CPU). ``tensor`` hands
colocated engines CUDA-IPC handles (``/update_weights_from_tensor``); on CPU it works with the
embedded engine through shared memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from megatron_vespo.weight_sync.config import WeightSyncConfig
from megatron_vespo.weight_sync.disk import DiskWeightSync

if TYPE_CHECKING:
    from megatron_vespo.rollout.interfaces import Engines

KINDS = ("disk", "distributed", "tensor")


class EngineWeightSync:
    """Base: disk export for the engines' start; ``update`` via ``/update_weights_from_disk``."""

    def __init__(self, root: str | Path, hf_cfg: Any, cfg: WeightSyncConfig, source_dir: Optional[str] = None):
        self.cfg = cfg
        self.disk = DiskWeightSync(root, hf_cfg, source_dir=source_dir, dtype=cfg.export_dtype,
                                   keep_last=cfg.keep_last)

    def export(self, model: Any, version: int) -> Path:
        """Collective: write ``version`` as an HF directory (rank 0 writes) and return its path."""
        return self.disk.export(model, version)

    def update(self, model: Any, version: int, engines: Optional[Engines] = None) -> dict[str, float]:
        """Collective: export ``version`` to disk and make the engines load it."""
        return self.disk.push(model, version, load=engines.router.update_weights_from_disk if engines else None,
                              run=engines.run if engines else None)

    def close(self, engines: Optional[Engines] = None) -> None:
        """Nothing to release for the disk path."""


class DistributedEngineSync(EngineWeightSync):
    """``update`` broadcasts over the weight-update group (``distributed.DistributedWeightSync``)."""

    def __init__(self, root: str | Path, hf_cfg: Any, cfg: WeightSyncConfig, source_dir: Optional[str] = None):
        from megatron_vespo.weight_sync.distributed import DistributedWeightSync

        super().__init__(root, hf_cfg, cfg, source_dir)
        self.sync = DistributedWeightSync(hf_cfg, cfg)

    def update(self, model: Any, version: int, engines: Optional[Engines] = None) -> dict[str, float]:
        """Collective: broadcast ``version`` into the engines (the group is created on first use)."""
        return self.sync.push(model, version, clients=engines.router.clients if engines else None,
                              run=engines.run if engines else None)

    def close(self, engines: Optional[Engines] = None) -> None:
        """Destroy the group on the engines and locally (rank 0)."""
        self.sync.disconnect(engines.run if engines is not None and not engines.loop.is_closed() else None)


class TensorEngineSync(EngineWeightSync):
    """``update`` hands colocated engines the bucket tensors (``tensor.TensorWeightSync``)."""

    def __init__(self, root: str | Path, hf_cfg: Any, cfg: WeightSyncConfig, source_dir: Optional[str] = None,
                 engine_tp_size: int = 1):
        from megatron_vespo.weight_sync.tensor import TensorWeightSync

        super().__init__(root, hf_cfg, cfg, source_dir)
        self.sync = TensorWeightSync(hf_cfg, cfg, engine_tp_size=engine_tp_size)

    def update(self, model: Any, version: int, engines: Optional[Engines] = None) -> dict[str, float]:
        """Collective: serialize every bucket on each rank; rank 0 posts the payloads.

        An embedded engine in this process (one rank) gets the tensors directly (``inprocess.py``).
        """
        from megatron_vespo.weight_sync.inprocess import in_process_engines, push_in_process

        local = in_process_engines(engines)
        if local is not None:
            return push_in_process(model, version, local, engines.router.clients, self.sync.dims, self.cfg)
        return self.sync.push(model, version, clients=engines.router.clients if engines else None,
                              run=engines.run if engines else None)

    def stage(self, model: Any, engines: Optional[Engines] = None) -> Any:
        """Collective (CPU): stage ``model``'s buckets in shared memory; rank 0 keeps the payloads for ``send``."""
        return self.sync.stage(model, clients=engines.router.clients if engines else None,
                               run=engines.run if engines else None)

    def send(self, staged: Any, version: int, engines: Engines, pause_mode: Optional[str] = None) -> dict[str, float]:
        """Rank 0: the engines load the staged buckets as ``version`` (no collectives); with ``pause_mode``
        generation is paused (that mode) around the weight-update window and continued after it."""
        router, pause, resume = engines.router, None, None
        if pause_mode is not None:
            pause = lambda: engines.run(router.pause_generation(pause_mode))  # noqa: E731
            resume = lambda: engines.run(router.continue_generation())  # noqa: E731
        return self.sync.send(staged, version, router.clients, engines.run, pause=pause, resume=resume)


def build_weight_sync(kind: str, *, root: str | Path, hf_cfg: Any, cfg: Optional[WeightSyncConfig] = None,
                      source_dir: Optional[str] = None, engine_tp_size: int = 1,
                      engine_ep_size: int = 1) -> EngineWeightSync:
    """The weight sync of ``weight_sync.kind``; ValueError names the choices.

    ``engine_tp_size`` / ``engine_ep_size``: the rollout engines' layout (checked against
    ``weight_sync.fp8_block_size`` when ``weight_sync.dtype=fp8``)."""
    cfg = cfg or WeightSyncConfig()
    if cfg.dtype == "fp8":  # refuse a layout the FP8 engine would reject, before the first sync
        from megatron_vespo.fp8.blockwise import check_block_layout

        check_block_layout(hf_cfg, cfg.fp8_block_size, engine_tp_size, engine_ep_size,
                           field=f"weight_sync.dtype=fp8 (weight_sync.fp8_block_size={list(cfg.fp8_block_size)})")
    if kind == "disk":
        return EngineWeightSync(root, hf_cfg, cfg, source_dir)
    if kind == "distributed":
        return DistributedEngineSync(root, hf_cfg, cfg, source_dir)
    if kind == "tensor":
        return TensorEngineSync(root, hf_cfg, cfg, source_dir, engine_tp_size=engine_tp_size)
    raise ValueError(f"weight_sync.kind must be one of {KINDS}, got {kind!r}")
