"""rollout component of megatron_vespo."""
