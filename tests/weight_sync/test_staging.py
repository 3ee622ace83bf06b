"""Persistent shared-memory staging of the tensor path's buckets (``weight_sync/staging.py``).

The reader is another process, as the engine is in a real job: it unpickles each payload with
the engine's allowlist unpickler and returns what it sees, so the tests check what crosses the
process boundary, not this process's own tensors.
"""

import multiprocessing as mp

import pytest
import torch

from megatron_vespo.weight_sync.staging import BucketStaging
from megatron_vespo.weight_sync.tensor import serialize


def _read(payloads, out):
    """Child: every payload -> {name: (dtype, shape, values as floats)} as the engine reconstructs it.

    Plain Python values: tensors sent back through the queue would travel as shared memory too.
    """
    from megatron_vespo.rollout.embedded.weight_update import deserialize_named_tensors

    res = []
    for p in payloads:
        res.append({n: (str(t.dtype), list(t.shape), t.float().flatten().tolist())
                    for n, t in deserialize_named_tensors(p, "flattened_bucket")})
    out.put(res)


def _read_in_child(payloads):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_read, args=(payloads, q))
    proc.start()
    try:
        return q.get(timeout=120)
    finally:
        proc.join(60)


def _bucket(seed):
    g = torch.Generator().manual_seed(seed)
    return [("a.weight", torch.randn(3, 5, generator=g)), ("b.bias", torch.randn(7, generator=g).to(torch.bfloat16)),
            ("c.weight", torch.randn(4, 4, generator=g).t())]  # a non-contiguous view, as exports yield


def test_refilled_buffer_carries_each_new_version_to_another_process_under_the_same_name():
    staging = BucketStaging()
    payloads, flats = [], []
    for seed in (1, 2, 3):
        data = staging.pack(0, _bucket(seed))
        flats.append(data["flattened_tensor"])
        payloads.append(serialize(data))  # pickled right away: the child reads after all three refills
        seen = _read_in_child([payloads[-1]])[0]
        for name, t in _bucket(seed):
            assert seen[name] == (str(t.dtype), list(t.shape), t.float().flatten().tolist()), (seed, name)
    assert staging.allocations == 1
    assert all(f is flats[0] for f in flats)  # one buffer, refilled in place
    assert len(set(payloads)) == 1  # same shared-memory name and metadata each time: no new file per sync


def test_a_changed_layout_gets_a_new_buffer_and_trim_drops_unused_slots():
    staging = BucketStaging()
    staging.pack(0, _bucket(1))
    staging.pack(1, _bucket(2))
    assert staging.allocations == 2
    grown = _bucket(3) + [("d.weight", torch.ones(2))]
    data = staging.pack(0, grown)
    assert staging.allocations == 3 and {m.name for m in data["metadata"]} == {n for n, _ in grown}
    reshaped = [(n, t.reshape(-1)) for n, t in _bucket(4)]
    staging.pack(0, reshaped)
    assert staging.allocations == 4  # same names, other shapes: not reused
    staging.trim(1)
    assert staging.nbytes == sum(t.numel() * t.element_size() for _, t in reshaped)
    with pytest.raises(ValueError, match="bucket index"):
        staging.pack(-1, _bucket(1))
