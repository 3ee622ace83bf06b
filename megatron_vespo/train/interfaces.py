"""What the RL loop needs from a trainer, as a protocol (:class:`Actor`).

``orchestration/`` drives the trainer through these members only: one call per rollout batch
(``train_on_rollout``), a validation the rank-0 broadcast runs before sending a batch
(``validate_batch``), and the parts a checkpoint and a weight sync read (``model`` chunks,
``optimizer``, ``scheduler``, ``updates``, ``hf_cfg``, the parallel ``info``, ``train_cfg``).
:class:`~megatron_vespo.train.actor.MegatronActor` is the implementation; a stand-in that
provides these members can run the loops. ``tests/test_interfaces.py`` checks the real class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from megatron_vespo.parallel.state import ParallelInfo
    from megatron_vespo.train.config import TrainConfig
    from megatron_vespo.types import TrainBatch


@runtime_checkable
class Actor(Protocol):
    """The trainer as the loops see it (``train/actor.py`` is the implementation)."""

    model: list["torch.nn.Module"]
    """Model chunks (Megatron DDP-wrapped; one per virtual pipeline stage)."""
    optimizer: Any
    """Megatron's ``MegatronOptimizer`` (checkpointed with the model)."""
    scheduler: Any
    """Megatron's ``OptimizerParamScheduler``."""
    updates: int
    """Optimizer updates so far (saved with the loop state)."""
    hf_cfg: Any
    """The HF ``PretrainedConfig`` of the model (weight-sync names, vocab size)."""
    info: "ParallelInfo"
    """This rank's place in the parallel layout (DP rank and size for the batch broadcast)."""
    train_cfg: "TrainConfig"

    def validate_batch(self, batch: "TrainBatch") -> None:
        """Raise ValueError naming the field when ``train_on_rollout`` cannot train on ``batch``."""
        ...

    def train_on_rollout(self, batch: "TrainBatch") -> list[dict[str, float]]:
        """Consume one rollout batch in N optimizer updates; one metrics dict per update."""
        ...
