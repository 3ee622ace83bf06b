"""train component of megatron_vespo."""
