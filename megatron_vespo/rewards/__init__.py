"""rewards component of megatron_vespo."""
