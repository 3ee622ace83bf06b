"""megatron_vespo: off-policy RL post-training for MoE LLMs on Megatron-Core.

Data flow (one short loop in ``orchestration/``)::

    prompts -> rollout (SGLang or embedded CPU server) -> Sample(tokens, rollout
    log-probs, routed experts, reward) -> buffer (groups, advantages, policy
    version) -> Megatron trainer (losses registry, routing replay R2/R3)
    -> weight sync -> rollout

``import megatron_vespo`` needs only torch; Megatron-Core, SGLang, Ray and
Transformer Engine are optional extras imported where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
