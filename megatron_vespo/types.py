"""Typed stage boundaries of the RL loop.

``Sample`` is what one rollout request yields (one prompt, one response); it is
carried unchanged from the rollout engine through the buffer to the trainer, as
slime's ``Sample`` is. ``TrainBatch`` is the padded, tensorised form the Megatron
actor consumes.

Shapes: P = prompt length, T = response length, L = number of MoE layers,
K = router top-k, B = batch size, S = padded sequence length.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class SampleStatus(str, enum.Enum):
    """How generation of a sample ended."""

    COMPLETED = "completed"  # stop token or stop string
    TRUNCATED = "truncated"  # hit max_new_tokens
    ABORTED = "aborted"  # aborted by the engine (weight update, pause)
    FLAGGED = "flagged"  # data inconsistent (e.g. routes misaligned); never trained on


@dataclass
class Sample:
    """One prompt and one generated response, as returned by the rollout engine.

    Attributes:
        prompt_tokens: [P] prompt token ids.
        response_tokens: [T] generated token ids.
        rollout_log_probs: [T] float32 log mu(y_t | x, y_<t) from the rollout engine, or None.
        routed_experts: [P + T - 1, L, K] expert ids chosen by the rollout engine for every
            token that went through a forward pass (all tokens but the last), stored in the
            smallest unsigned integer dtype that holds the expert count (uint8 for <= 256
            experts), or None when routing capture is off.
        reward: scalar reward, filled by ``rewards/``.
        group_index: id of the prompt group (GRPO-style n samples per prompt).
        policy_version: version of the weights that generated this sample.
        status: how generation ended.
        metadata: free-form (label, prompt text, engine meta info).
    """

    prompt_tokens: list[int]
    response_tokens: list[int]
    rollout_log_probs: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None
    reward: float = 0.0
    group_index: int = 0
    policy_version: int = 0
    status: SampleStatus = SampleStatus.COMPLETED
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> list[int]:
        """[P + T] prompt followed by response."""
        return list(self.prompt_tokens) + list(self.response_tokens)

    def __post_init__(self) -> None:
        t = len(self.response_tokens)
        if self.rollout_log_probs is not None and self.rollout_log_probs.shape != (t,):
            raise ValueError(f"Sample.rollout_log_probs has shape {tuple(self.rollout_log_probs.shape)}, "
                             f"expected ({t},) = number of response tokens")
        if self.routed_experts is not None:
            n = len(self.prompt_tokens) + t - 1
            if self.routed_experts.dim() != 3 or self.routed_experts.shape[0] != n:
                raise ValueError(f"Sample.routed_experts has shape {tuple(self.routed_experts.shape)}, "
                                 f"expected [{n}, num_moe_layers, topk] (prompt + response - 1 tokens)")


    # Pickling: Ray hands every rollout group from the async loop's worker to the trainer. torch
    # pickles each tensor through torch.serialization (~0.2 ms apiece): 64 samples cost 12-25 ms
    # per rollout batch, the floor of the trainer's time/wait_s (issue 15). As numpy arrays the
    # two tensor fields pickle in microseconds (and Ray's pickle5 moves them out of band).
    _TENSOR_FIELDS = ("rollout_log_probs", "routed_experts")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in self._TENSOR_FIELDS:
            t = state.get(k)
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES:
                state[k] = t.detach().numpy()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k in self._TENSOR_FIELDS:
            a = state.get(k)
            if isinstance(a, np.ndarray):  # read-only when Ray mapped it from its object store
                state[k] = torch.from_numpy(a if a.flags.writeable else a.copy())
        self.__dict__.update(state)


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                 torch.uint8, torch.bool}


@dataclass
class TrainBatch:
    """A padded batch for the Megatron actor (right padding).

    Attributes:
        tokens: [B, S] int64 token ids (prompt + response, padded with 0).
        loss_mask: [B, S] float32, 1.0 on response tokens whose log-prob is trained.
            Position s holds the mask of token s (its log-prob is predicted at s - 1).
        attention_lengths: [B] int64 number of real (unpadded) tokens per row.
        advantages: [B] float32 sequence advantages.
        rollout_log_probs: [B, S] float32 rollout engine log-probs aligned like loss_mask, or None.
        routed_experts: [B, S, L, K] int64 rollout routes aligned with ``tokens``, or None.
        group_index: [B] int64 prompt-group ids.
        policy_version: [B] int64 version of the policy that generated each row.
    """

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    attention_lengths: torch.Tensor
    advantages: torch.Tensor
    rollout_log_probs: torch.Tensor | None = None
    routed_experts: torch.Tensor | None = None
    group_index: torch.Tensor | None = None
    policy_version: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of rows B."""
        return int(self.tokens.shape[0])

    def select(self, rows: torch.Tensor | slice) -> "TrainBatch":
        """Return the sub-batch of the given rows (a mini- or micro-batch)."""
        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows]
        return TrainBatch(
            tokens=self.tokens[rows], loss_mask=self.loss_mask[rows],
            attention_lengths=self.attention_lengths[rows], advantages=self.advantages[rows],
            rollout_log_probs=pick(self.rollout_log_probs), routed_experts=pick(self.routed_experts),
            group_index=pick(self.group_index), policy_version=pick(self.policy_version),
        )
