"""checkpoint component of megatron_vespo."""
