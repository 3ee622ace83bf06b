"""routing component of megatron_vespo."""
