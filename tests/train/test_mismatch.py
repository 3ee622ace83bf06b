"""Train/inference mismatch diagnostics against straightforward loop re-derivations."""

import math

import pytest
import torch

from megatron_vespo.routing.routes import NO_ROUTE
from megatron_vespo.train.mismatch import log_prob_mismatch, routing_agreement, routing_agreement_counts


def test_log_prob_mismatch_matches_loops():
    g = torch.Generator().manual_seed(0)
    train, roll = -torch.rand(3, 6, generator=g), -torch.rand(3, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0] * 6], dtype=torch.float)
    m = log_prob_mismatch(train, roll, mask)
    diffs = [float(train[b, s] - roll[b, s]) for b in range(3) for s in range(6) if mask[b, s]]
    seqs = [sum(float(train[b, s] - roll[b, s]) for s in range(6) if mask[b, s]) for b in range(2)]
    assert m["mismatch/abs_diff_max"] == pytest.approx(max(abs(d) for d in diffs))
    assert m["mismatch/abs_diff_mean"] == pytest.approx(sum(abs(d) for d in diffs) / len(diffs))
    assert m["mismatch/k3_kl"] == pytest.approx(sum(math.exp(d) - 1 - d for d in diffs) / len(diffs))
    assert m["mismatch/seq_log_ratio_absmax"] == pytest.approx(max(abs(x) for x in seqs))
    assert m["mismatch/k3_kl"] >= 0
    same = log_prob_mismatch(train, train, mask)
    assert same["mismatch/abs_diff_max"] == 0 and same["mismatch/k3_kl"] == 0
    assert log_prob_mismatch(train, roll, torch.zeros_like(mask))["mismatch/abs_diff_max"] == 0
    with pytest.raises(ValueError, match="same"):
        log_prob_mismatch(train, roll[:, :3], mask)


def test_routing_agreement_counts_sets_not_order():
    trainer = torch.tensor([[[[0, 1], [2, 3]], [[4, 5], [NO_ROUTE, NO_ROUTE]]]])  # [1, 2, 2, 2]
    rollout = torch.tensor([[[[1, 0], [2, 7]], [[6, 7], [1, 2]]]])
    counts = routing_agreement_counts(trainer, rollout)
    # token-layers routed on both sides: 3; shared experts: 2 + 1 + 0; identical sets: 1
    assert counts.tolist() == [3.0, 3.0, 1.0]
    r = routing_agreement(counts, topk=2)
    assert r == {"routing/expert_overlap": 3 / 6, "routing/exact_match": 1 / 3}
    assert routing_agreement(torch.zeros(3, dtype=torch.float64), topk=2) == {}
    with pytest.raises(ValueError, match=r"\[B, S, L, K\]"):
        routing_agreement_counts(trainer, rollout[..., :1])


def test_actor_routing_drift_counts_only_recorded_rows_in_chunks(monkeypatch):
    """The actor's chunked drift (rows this rank recorded) equals the whole-batch counts."""
    import types

    from megatron_vespo.routing.routes import NO_ROUTE
    from megatron_vespo.train.actor import MegatronActor

    g = torch.Generator().manual_seed(0)
    b, s, n_layers, k, e = 11, 7, 3, 2, 6
    rollout = torch.rand(b, s, n_layers, e, generator=g).topk(k, -1).indices
    trainer = torch.rand(b, s, n_layers, e, generator=g).topk(k, -1).indices
    trainer[[1, 4, 5, 9]] = NO_ROUTE  # rows another DP rank recorded
    trainer[:, :, 2] = NO_ROUTE  # a layer of another pipeline stage
    rollout[:, 5:] = NO_ROUTE  # beyond the rollout's routes
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 1)
    fake = types.SimpleNamespace(info=types.SimpleNamespace(device=torch.device("cpu")),
                                 hf_cfg=types.SimpleNamespace(num_experts_per_tok=k))
    got = MegatronActor._routing_drift(fake, trainer, rollout.to(torch.int32))
    assert got == routing_agreement(routing_agreement_counts(trainer, rollout), k)
    assert got["routing/expert_overlap"] > 0
