"""Persistent shared-memory staging of flattened buckets, for the tensor path on CPU.

``TensorWeightSync`` hands colocated engines ``update_weights_from_tensor`` payloads: a pickled
flattened bucket (``wire.flattened_bucket``). Built afresh in every sync on CPU, each bucket costs
two copies of its bytes and a new ``/dev/shm`` file: ``torch.cat`` into a new tensor, then
pickling moves that storage into a new shared-memory file (torch's ``file_system`` sharing:
``THPStorage_shareFilename`` in torch/csrc/StorageSharing.cpp allocates a managed shared
storage, copies the data over and swaps it in), and the engine maps the new file. A buffer kept
from one sync to the next is moved into shared memory once, on its first pickling; after that
pickling returns its existing name (the same function finds the managed allocator and copies
nothing), so a sync is one copy of the new values into the buffer plus a handle of a few
hundred bytes.

Safety: the engine copies the bucket out before answering its request. The trainer rewrites a
buffer only in the next sync, after that answer (the synchronous push waits for it; the deferred
load is joined first: ``orchestration/weight_load.py``), so an engine never reads a
half-written buffer.

Only for CPU buffers: on GPU a persistent buffer per bucket would hold a second copy of the
whole model in device memory (SGLang's colocated path sends one bucket at a time and frees it).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from megatron_vespo.wire import aligned_order, flattened_bucket


def _layout(ordered: Sequence[tuple[str, torch.Tensor]]) -> tuple:
    """What decides whether a staged buffer can be reused: names, dtypes and shapes, in order."""
    return tuple((name, t.dtype, tuple(t.shape)) for name, t in ordered)


class BucketStaging:
    """One persistent flattened bucket per bucket index; ``pack`` refills it in place.

    A bucket whose layout changed (another model, another bucket size) gets a new buffer; the
    old one is dropped (its shared-memory file goes when the engine has released it too).
    """

    def __init__(self) -> None:
        # per bucket: (layout, the flattened bucket, each tensor's typed view into the flat buffer)
        self._slots: list[Optional[tuple[tuple, dict[str, Any], list[torch.Tensor]]]] = []
        self.allocations = 0  # buffers created so far (tests read it)

    def pack(self, index: int, named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Bucket ``index`` as SGLang's flattened bucket, in the persistent buffer when its layout matches.

        Returns ``{"flattened_tensor": uint8[bytes], "metadata": [...]}``; the tensor is the
        staged buffer itself (valid until the next ``pack`` of this index).
        """
        if index < 0:
            raise ValueError(f"bucket index must be >= 0, got {index}")
        ordered = aligned_order(named)
        key = _layout(ordered)
        while len(self._slots) <= index:
            self._slots.append(None)
        slot = self._slots[index]
        if slot is None or slot[0] != key:
            data = flattened_bucket([(n, t.detach().cpu()) for n, t in ordered])
            flat = data["flattened_tensor"]
            views = [flat[m.start_idx:m.end_idx].view(t.dtype).view(t.shape)
                     for (_, t), m in zip(ordered, data["metadata"])]
            self._slots[index] = (key, data, views)
            self.allocations += 1
            return data
        _, data, views = slot
        for (_, t), view in zip(ordered, views):
            view.copy_(t.detach())
        return data

    def named_views(self) -> dict[str, torch.Tensor]:
        """Every staged tensor's typed view into its flat buffer, by name (all buckets)."""
        return {name: view for slot in self._slots if slot is not None for (name, _, _), view in zip(slot[0], slot[2])}

    def buckets(self) -> list[dict[str, Any]]:
        """The staged flattened buckets in index order (each valid until the next ``pack`` of its index)."""
        if any(slot is None for slot in self._slots):
            raise RuntimeError("a bucket index was never staged")
        return [slot[1] for slot in self._slots]

    def trim(self, n_buckets: int) -> None:
        """Forget the buffers of bucket indices ``>= n_buckets`` (the model now exports fewer buckets)."""
        del self._slots[n_buckets:]

    @property
    def nbytes(self) -> int:
        """Bytes held in staged buffers."""
        return sum(s[1]["flattened_tensor"].numel() for s in self._slots if s is not None)
