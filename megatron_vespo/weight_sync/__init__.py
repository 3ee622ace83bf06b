"""Weight sync from the Megatron trainer to the rollout engines (HF names, bucketed export).

``build_weight_sync(weight_sync.kind, ...)`` picks the path: ``disk`` (``DiskWeightSync``),
``distributed`` (``DistributedWeightSync``: broadcast over a process group with the engines) or
``tensor`` (``TensorWeightSync``: colocated engines, CUDA IPC). See docs/weight_sync.md.
"""

from megatron_vespo.weight_sync.config import WeightSyncConfig
from megatron_vespo.weight_sync.disk import DiskWeightSync, version_dir
from megatron_vespo.weight_sync.factory import EngineWeightSync, build_weight_sync

__all__ = ["DiskWeightSync", "EngineWeightSync", "WeightSyncConfig", "build_weight_sync", "version_dir"]
