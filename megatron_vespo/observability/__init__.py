"""observability component of megatron_vespo."""
