"""Route conversion, validation and per-rank slicing (pure tensor tests)."""

import pytest
import torch

from megatron_vespo.routing.routes import (
    NO_ROUTE,
    collate_routes,
    fill_unrouted,
    replay_tensors,
    sample_routes_to_rows,
    validate_batch_routes,
)


def _routes(n, layers=2, k=2, experts=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, layers, experts, generator=g).topk(k, dim=-1).indices.to(torch.uint8)


def test_sample_routes_align_with_tokens_and_mark_the_last_token_unrouted():
    r = _routes(5)  # SGLang: P + T - 1 = 5 rows for a 6-token sequence
    rows = sample_routes_to_rows(r, seq_len=8, sample=3)
    assert rows.dtype == torch.long and rows.shape == (8, 2, 2)
    assert torch.equal(rows[:5], r.long())
    assert bool((rows[5:] == NO_ROUTE).all())  # last real token (5) and padding (6, 7)
    with pytest.raises(ValueError, match="sample 3"):
        sample_routes_to_rows(_routes(8), seq_len=8, sample=3)


def test_collate_checks_each_sample_length_and_names_it():
    batch = collate_routes([_routes(5), _routes(3)], lengths=[6, 4], seq_len=6)
    assert batch.shape == (2, 6, 2, 2)
    with pytest.raises(ValueError, match=r"sample 1: routed_experts has shape \(4, 2, 2\), expected \[3, L, K\]"):
        collate_routes([_routes(5), _routes(4)], lengths=[6, 4], seq_len=6)
    with pytest.raises(ValueError, match="sample 1"):
        collate_routes([_routes(5), _routes(3, layers=3)], lengths=[6, 4], seq_len=6)


def test_validate_names_the_sample_and_the_problem():
    routes = collate_routes([_routes(5), _routes(3)], lengths=[6, 4], seq_len=6)
    lengths = torch.tensor([6, 4])
    validate_batch_routes(routes, lengths, num_moe_layers=2, topk=2, num_experts=8)
    with pytest.raises(ValueError, match=r"expected \[B=2, S, L=3, K=2\]"):
        validate_batch_routes(routes, lengths, num_moe_layers=3, topk=2, num_experts=8)
    bad = routes.clone()
    bad[1, 2, 0] = torch.tensor([4, 4])
    with pytest.raises(ValueError, match="sample 1 position 2 .* same expert twice"):
        validate_batch_routes(bad, lengths, num_moe_layers=2, topk=2, num_experts=8)
    bad = routes.clone()
    bad[0, 1, 1, 0] = 9
    with pytest.raises(ValueError, match="sample req-a position 1 .* outside"):
        validate_batch_routes(bad, lengths, num_moe_layers=2, topk=2, num_experts=8, sample_ids=["req-a", "req-b"])
    short = routes.clone()
    short[0, 4] = NO_ROUTE  # a route missing inside the sequence (engine returned too few rows)
    with pytest.raises(ValueError, match="sample 0 position 4"):
        validate_batch_routes(short, lengths, num_moe_layers=2, topk=2, num_experts=8)


def test_fill_unrouted_uses_distinct_filler_only_where_no_log_prob_depends_on_it():
    routes = collate_routes([_routes(5), _routes(3)], lengths=[6, 4], seq_len=6)
    filled = fill_unrouted(routes, torch.tensor([6, 4]))
    assert torch.equal(filled[0, :5], routes[0, :5]) and torch.equal(filled[1, :3], routes[1, :3])
    assert torch.equal(filled[1, 3:], torch.tensor([0, 1]).expand(3, 2, 2))
    assert bool((filled >= 0).all())


def test_spread_filler_is_distinct_per_row_and_balanced_over_experts():
    """Padding must not all go to experts 0..K-1 (one EP rank would receive every padding token)."""
    routes = collate_routes([_routes(5), _routes(3)], lengths=[6, 4], seq_len=6)
    long = torch.cat([routes, torch.full((2, 58, 2, 2), NO_ROUTE)], dim=1)  # right padding to S = 64
    filled = fill_unrouted(long, torch.tensor([6, 4]), num_experts=8)
    assert torch.equal(filled[0, :5], long[0, :5]) and torch.equal(filled[1, :3], long[1, :3])
    tail = filled[1, 3:]  # [61, L, K]
    assert bool((tail >= 0).all()) and bool((tail < 8).all())
    assert bool((tail[..., 0] != tail[..., 1]).all())  # K distinct experts per row
    counts = torch.bincount(tail[:, 0].flatten(), minlength=8)
    assert int(counts.max()) - int(counts.min()) <= 1  # even over all 8 experts
    validate_batch_routes(filled, torch.full((2,), 64), num_moe_layers=2, topk=2, num_experts=8)
    with pytest.raises(ValueError, match="num_experts"):
        fill_unrouted(long, torch.tensor([6, 4]), num_experts=1)


def test_replay_tensors_are_sequence_major_and_sp_shards_concatenate_to_the_full_tensor():
    b, s, n_layers, k = 3, 8, 4, 2
    routes = torch.arange(b * s * n_layers * k).view(b, s, n_layers, k)
    full = replay_tensors(routes, [1, 3])
    assert [t.shape for t in full] == [(s * b, k)] * 2
    for row in range(s * b):  # row = position * B + sample
        pos, j = divmod(row, b)
        assert torch.equal(full[0][row], routes[j, pos, 1]) and torch.equal(full[1][row], routes[j, pos, 3])
    shards = [replay_tensors(routes, [1, 3], tp_rank=r, tp_size=2, sequence_parallel=True) for r in range(2)]
    for li in range(2):
        assert torch.equal(torch.cat([sh[li] for sh in shards]), full[li])
    with pytest.raises(ValueError, match="not divisible"):
        replay_tensors(routes[:, :7], [0], tp_rank=0, tp_size=2, sequence_parallel=True)
