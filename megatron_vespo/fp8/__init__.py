"""fp8 component of megatron_vespo."""
