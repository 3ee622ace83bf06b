"""orchestration component of megatron_vespo."""
