"""Rollout buffer: group advantages, staleness filtering, collation into ``TrainBatch``."""

from megatron_vespo.buffer.advantages import group_advantages
from megatron_vespo.buffer.batch import collate, drop_unusable_groups

__all__ = ["collate", "drop_unusable_groups", "group_advantages"]
