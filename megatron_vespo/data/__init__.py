"""data component of megatron_vespo."""
