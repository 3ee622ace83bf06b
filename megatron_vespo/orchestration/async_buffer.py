"""Bounded group buffer and staleness control of the fully asynchronous loop (no Ray needed).

Versions. The trainer's policy version ``v`` counts weight syncs: the engines serve ``v``
while the trainer trains its ``(v + 1)``-th rollout batch. A sample is tagged with the version
that generated its *first* token (``rollout.protocol`` takes the oldest span of SGLang's
``weight_versions``), so a response finished by newer weights after an in-place pause still
counts as old. A group's version is the oldest of its samples and its **policy lag** is
``v - group version``; sync mode always has lag 0.

Two mechanisms bound the lag:

* **Admission** (AReaL's ``StalenessManager`` rule, our own code): with ``B`` groups per
  rollout batch and ``v0`` the version the run (or resume) started at, the worker may have
  at most ``(max_policy_lag + 1 + v - v0) x B`` groups accepted or in flight since the start.
  Groups are consumed in completion order, ``B`` per version, so a group admitted under
  version ``g`` is consumed by version ``<= g + max_policy_lag`` unless a later-admitted one
  overtakes it -- which the filter below catches. Since the trainer consumes exactly ``B``
  groups per version, the rule amounts to: groups buffered + in flight <= ``(L + 1) x B``
  while the trainer waits for data and ``<= L x B`` while it trains on a batch it took (so
  ``L = 0`` never generates during training: there is no newer policy to generate with).
  Groups dropped as stale give their slot back (else the trainer could starve).
* **Filter** (the guarantee): ``GroupBuffer.take`` drops every group whose lag exceeds
  ``max_policy_lag`` when the trainer pulls, so no trained sample is staler than that.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from megatron_vespo.types import Sample

Group = list[Sample]


def group_version(group: Sequence[Sample]) -> int:
    """Version of a group: the oldest first-token version among its samples (conservative)."""
    if not group:
        raise ValueError("group_version got an empty group")
    return min(int(s.policy_version) for s in group)


def policy_lag(group: Sequence[Sample], current_version: int) -> int:
    """``current_version - group_version(group)``; negative means the tag is from the future (a bug)."""
    lag = int(current_version) - group_version(group)
    if lag < 0:
        raise ValueError(f"group {group[0].group_index} is tagged version {group_version(group)}, newer than the "
                         f"trainer's version {current_version}: the engines' weight version is not the trainer's")
    return lag


def lag_metrics(groups: Iterable[Sequence[Sample]], current_version: int, max_policy_lag: int) -> dict[str, float]:
    """Per-sample lag histogram (``async/lag_hist_<k>`` sample counts for k = 0..max), mean and max."""
    counts: Counter[int] = Counter()
    for g in groups:
        counts[policy_lag(g, current_version)] += len(g)
    n = sum(counts.values())
    out = {f"async/lag_hist_{k}": float(counts.get(k, 0)) for k in range(max_policy_lag + 1)}
    out["async/lag_mean"] = sum(k * c for k, c in counts.items()) / n if n else float("nan")
    out["async/lag_max"] = float(max(counts)) if counts else float("nan")
    return out


@dataclass
class TakeResult:
    """What one ``GroupBuffer.take`` handed out and dropped."""

    groups: list[Group] = field(default_factory=list)
    stale_groups: int = 0
    stale_samples: int = 0


class GroupBuffer:
    """FIFO of whole, scored groups waiting for the trainer, at most ``capacity`` groups."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1 group, got {capacity}")
        self.capacity = capacity
        self._groups: deque[Group] = deque()

    def __len__(self) -> int:
        return len(self._groups)

    @property
    def num_samples(self) -> int:
        """Samples held."""
        return sum(len(g) for g in self._groups)

    def groups(self) -> list[Group]:
        """The held groups, oldest first (a copy of the list)."""
        return list(self._groups)

    def put(self, group: Group) -> None:
        """Append a finished group; the producer must have reserved room (``StalenessGate``)."""
        if not group:
            raise ValueError("GroupBuffer.put got an empty group")
        if len(self._groups) >= self.capacity:
            raise RuntimeError(f"GroupBuffer overflow: {self.capacity} groups held; the producer admitted more "
                               "groups than the buffer can take")
        self._groups.append(group)

    def take(self, n_groups: int, current_version: int, max_policy_lag: int) -> TakeResult:
        """Pop ``n_groups`` groups with lag <= ``max_policy_lag``, oldest first, dropping stale ones met on the way.

        All or nothing: when fewer than ``n_groups`` usable groups are held, the usable ones
        stay (only stale groups are removed) and the result has no groups.
        """
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        result = TakeResult()
        fresh: deque[Group] = deque()
        for g in self._groups:
            if policy_lag(g, current_version) > max_policy_lag:
                result.stale_groups += 1
                result.stale_samples += len(g)
            else:
                fresh.append(g)
        self._groups = fresh
        if len(fresh) >= n_groups:
            result.groups = [self._groups.popleft() for _ in range(n_groups)]
        return result


class StalenessGate:
    """Admission control: how many more groups the worker may start now.

    Args:
        groups_per_batch: B, groups the trainer consumes per version.
        max_policy_lag: L.
        start_version: v0, the trainer's version when the worker started.
        max_inflight: groups generated concurrently at most.
        buffer_capacity: groups finished but not consumed, at most.
    """

    def __init__(self, groups_per_batch: int, max_policy_lag: int, start_version: int, *,
                 max_inflight: int, buffer_capacity: int) -> None:
        if groups_per_batch < 1 or max_policy_lag < 0 or max_inflight < 1:
            raise ValueError(f"need groups_per_batch >= 1, max_policy_lag >= 0, max_inflight >= 1; got "
                             f"{groups_per_batch}, {max_policy_lag}, {max_inflight}")
        if buffer_capacity < groups_per_batch:
            raise ValueError(f"buffer capacity {buffer_capacity} groups < {groups_per_batch} groups per rollout "
                             "batch: the trainer could never pull a full batch")
        self.groups_per_batch, self.max_policy_lag = groups_per_batch, max_policy_lag
        self.start_version = start_version
        self.max_inflight, self.buffer_capacity = max_inflight, buffer_capacity
        self.accepted = 0  # groups put in the buffer since the start and not dropped as stale
        self.running = 0  # groups being generated

    def capacity(self, current_version: int, buffered: int) -> int:
        """Groups that may be started now (<= 0: none)."""
        staleness = ((self.max_policy_lag + 1 + current_version - self.start_version) * self.groups_per_batch
                     - self.accepted - self.running)
        return min(self.max_inflight - self.running, self.buffer_capacity - buffered - self.running, staleness)

    def on_started(self) -> None:
        """A group's generation started."""
        self.running += 1

    def on_accepted(self) -> None:
        """A started group finished usable and went into the buffer."""
        self.running -= 1
        self.accepted += 1

    def on_rejected(self) -> None:
        """A started group finished unusable (flagged, aborted): its slot is free again."""
        self.running -= 1

    def on_stale(self, n_groups: int) -> None:
        """``n_groups`` buffered groups were dropped as stale: their slots are free again.

        Without this, dropped groups would keep counting against the budget although the
        trainer never consumes them, and the trainer could wait forever for a full batch.
        """
        self.accepted -= n_groups
