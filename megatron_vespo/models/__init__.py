"""The policy model: Qwen3-MoE as a Megatron-Core ``GPTModel``.

Open ``qwen3_moe`` first: it turns a Hugging Face ``Qwen3MoeConfig`` into Megatron's
``TransformerConfig`` and layer spec (Transformer Engine spec on GPU, local spec on CPU) and
builds the (sharded) model.

* ``config``: ``ModelConfig`` (preset or HF path, dtype, Megatron overrides).
* ``presets``: named architectures (``qwen3-30b-a3b``, ``tiny``) as HF config kwargs.
* ``init``: layout-invariant random initialisation (the same weights under any TP/EP/PP).
"""
