"""Weight sync from the Megatron trainer to the rollout engines (HF names, bucketed export)."""

from megatron_vespo.weight_sync.disk import DiskWeightSync, version_dir

__all__ = ["DiskWeightSync", "version_dir"]
