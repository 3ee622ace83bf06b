"""losses component of megatron_vespo."""
