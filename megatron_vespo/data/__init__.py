"""Prompt data: JSONL files or the synthetic task, with resumable order."""

from megatron_vespo.data.prompts import (
    Prompt,
    PromptDataset,
    check_context_length,
    load_jsonl_prompts,
    synthetic_prompts,
)

__all__ = ["Prompt", "PromptDataset", "check_context_length", "load_jsonl_prompts", "synthetic_prompts"]
