"""compat component of megatron_vespo."""
