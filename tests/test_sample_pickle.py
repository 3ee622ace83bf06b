"""Sample pickling (Ray moves rollout groups from the async worker to the trainer): the tensor
fields travel as numpy arrays and come back as the same tensors (issue 15: torch's per-tensor
pickling was 12-25 ms of every rollout batch's hand-off)."""

import pickle

import numpy as np
import pytest
import torch

from megatron_vespo.types import Sample, SampleStatus


def _sample(**kw):
    return Sample([1, 5, 6], [8, 9], reward=0.5, group_index=3, policy_version=7, status=SampleStatus.TRUNCATED,
                  metadata={"label": "57", "meta_info": {"weight_version": "7"}}, **kw)


@pytest.mark.parametrize("dumps", [lambda s: pickle.dumps(s, protocol=5), lambda s: pickle.dumps(s, protocol=2)])
def test_round_trip_keeps_every_field_dtype_and_value(dumps):
    lp = torch.tensor([-0.5, -1.25])
    routes = torch.arange(4 * 2 * 3, dtype=torch.int16).reshape(4, 2, 3)
    s = _sample(rollout_log_probs=lp, routed_experts=routes)
    state = s.__getstate__()
    assert isinstance(state["rollout_log_probs"], np.ndarray) and isinstance(state["routed_experts"], np.ndarray)
    t = pickle.loads(dumps(s))
    assert isinstance(t.rollout_log_probs, torch.Tensor) and t.rollout_log_probs.dtype == torch.float32
    assert torch.equal(t.rollout_log_probs, lp) and torch.equal(t.routed_experts, routes)
    assert t.routed_experts.dtype == torch.int16
    for f in ("prompt_tokens", "response_tokens", "reward", "group_index", "policy_version", "status", "metadata"):
        assert getattr(t, f) == getattr(s, f), f
    t.rollout_log_probs[0] = 0.0  # writable, and not shared with the original
    assert lp[0] == -0.5


def test_none_bf16_and_read_only_arrays():
    t = pickle.loads(pickle.dumps(_sample()))
    assert t.rollout_log_probs is None and t.routed_experts is None
    bf = torch.tensor([-0.5, -1.0], dtype=torch.bfloat16)  # numpy has no bfloat16: stays a torch tensor
    s = _sample(rollout_log_probs=bf)
    assert isinstance(s.__getstate__()["rollout_log_probs"], torch.Tensor)
    assert torch.equal(pickle.loads(pickle.dumps(s)).rollout_log_probs, bf)
    state = _sample(rollout_log_probs=torch.tensor([-0.5, -1.0])).__getstate__()
    state["rollout_log_probs"].setflags(write=False)  # as Ray maps it from its object store
    r = Sample.__new__(Sample)
    r.__setstate__(state)
    r.rollout_log_probs[1] = 0.0
    assert r.rollout_log_probs.tolist() == [-0.5, 0.0]
