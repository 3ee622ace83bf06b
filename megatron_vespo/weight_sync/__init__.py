"""weight_sync component of megatron_vespo."""
