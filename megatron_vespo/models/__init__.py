"""models component of megatron_vespo."""
