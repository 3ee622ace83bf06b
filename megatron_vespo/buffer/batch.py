"""From scored ``Sample``s to a padded ``TrainBatch`` the Megatron actor consumes.

Alignment (right padding, S = max(P + T) over the batch):

- ``tokens[b, :P+T]`` = prompt then response; the rest is ``pad_token_id``.
- ``loss_mask[b, s] = 1`` for response positions s in [P, P+T) (the log-prob of token s is
  predicted from position s - 1; the actor shifts).
- ``rollout_log_probs[b, s]`` holds mu(token s) at the same response positions, 0 elsewhere.
- ``routed_experts[b, s]`` holds the experts the rollout engine chose for token s, for
  s in [0, P+T-1) (SGLang returns routes for every token but the last, which never went through
  a forward pass); the last real position and the padding hold ``NO_ROUTE``
  (``routing.routes.collate_routes``, which also explains why that is harmless).

Samples marked ``FLAGGED`` (e.g. misaligned routes) are never trained on: their whole
prompt group is dropped so group losses (GEPO, SNIS) and group advantages stay consistent.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

import torch

from megatron_vespo.buffer.advantages import AdvantageEstimator, group_advantages
from megatron_vespo.routing.routes import collate_routes
from megatron_vespo.types import Sample, SampleStatus, TrainBatch

logger = logging.getLogger(__name__)


def drop_unusable_groups(samples: Sequence[Sample], current_version: int | None = None,
                         max_policy_lag: int | None = None) -> list[Sample]:
    """Drop every group holding a FLAGGED or ABORTED sample, or one older than ``max_policy_lag`` versions."""
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group_index].append(s)
    kept: list[Sample] = []
    for gid, group in groups.items():
        unusable = (SampleStatus.FLAGGED, SampleStatus.ABORTED)
        if any(s.status in unusable for s in group):
            reasons = {"; ".join(s.metadata.get("flag_reasons", [s.status.value])) for s in group
                       if s.status in unusable}
            logger.warning("dropping group %d (%d samples): %s", gid, len(group), "; ".join(sorted(reasons)))
            continue
        if max_policy_lag is not None and current_version is not None:
            lag = current_version - min(s.policy_version for s in group)
            if lag > max_policy_lag:
                logger.info("dropping group %d: policy lag %d > max_policy_lag %d", gid, lag, max_policy_lag)
                continue
        kept.extend(group)
    return kept


def collate(samples: Sequence[Sample], advantages: torch.Tensor | None = None,
            estimator: AdvantageEstimator = "grpo", pad_token_id: int = 0) -> TrainBatch:
    """Pad ``samples`` into a ``TrainBatch``; advantages come from group rewards unless given ([B])."""
    if not samples:
        raise ValueError("collate got no samples (all groups dropped?)")
    bad = [i for i, s in enumerate(samples) if s.status == SampleStatus.FLAGGED]
    if bad:
        raise ValueError(f"samples {bad} are FLAGGED and must not be trained on; call drop_unusable_groups first")
    bsz = len(samples)
    prompt_lens = [len(s.prompt_tokens) for s in samples]
    lengths = [p + len(s.response_tokens) for p, s in zip(prompt_lens, samples)]
    seq = max(lengths)
    has_lp = [s.rollout_log_probs is not None for s in samples]
    has_routes = [s.routed_experts is not None for s in samples]
    if any(has_lp) and not all(has_lp):
        raise ValueError(f"samples {[i for i, h in enumerate(has_lp) if not h]} lack rollout_log_probs "
                         "while others have them")
    if any(has_routes) and not all(has_routes):
        raise ValueError(f"samples {[i for i, h in enumerate(has_routes) if not h]} lack routed_experts "
                         "while others have them")
    if all(has_lp):
        wrong = [i for i, s in enumerate(samples) if tuple(s.rollout_log_probs.shape) != (len(s.response_tokens),)]
        if wrong:
            raise ValueError(f"samples {wrong}: rollout_log_probs must hold one value per response token")
    routes = None
    if all(has_routes):
        routes = collate_routes([s.routed_experts for s in samples], lengths, seq)
    # whole-batch tensor ops: writing each row's slices cost ~4 small torch calls per sample
    tokens = torch.tensor([list(s.tokens) + [pad_token_id] * (seq - n) for s, n in zip(samples, lengths)],
                          dtype=torch.long)
    pos = torch.arange(seq)
    response = (pos >= torch.tensor(prompt_lens)[:, None]) & (pos < torch.tensor(lengths)[:, None])  # [B, S]
    loss_mask = response.float()
    rollout_lp = None
    if all(has_lp):
        rollout_lp = torch.zeros(bsz, seq)
        rollout_lp[response] = torch.cat([s.rollout_log_probs.float() for s in samples])  # row-major = sample order
    group_index = torch.tensor([s.group_index for s in samples], dtype=torch.long)
    if advantages is None:
        rewards = torch.tensor([float(s.reward) for s in samples])
        advantages = group_advantages(rewards, group_index, estimator)
    elif advantages.shape != (bsz,):
        raise ValueError(f"advantages must be [B={bsz}], got {tuple(advantages.shape)}")
    return TrainBatch(
        tokens=tokens, loss_mask=loss_mask, attention_lengths=torch.tensor(lengths, dtype=torch.long),
        advantages=advantages.float(), rollout_log_probs=rollout_lp, routed_experts=routes,
        group_index=group_index, policy_version=torch.tensor([s.policy_version for s in samples]),
    )
