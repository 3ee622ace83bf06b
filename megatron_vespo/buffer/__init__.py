"""buffer component of megatron_vespo."""
