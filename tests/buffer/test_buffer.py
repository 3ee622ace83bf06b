"""Group advantages and collation of Samples into a TrainBatch."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_vespo.buffer import collate, drop_unusable_groups, group_advantages
from megatron_vespo.routing.routes import NO_ROUTE
from megatron_vespo.types import Sample, SampleStatus


def _loop_reference(rewards, groups, estimator):
    out = []
    for r, g in zip(rewards, groups):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == g]
        n = len(members)
        if n == 1:
            out.append(0.0)
            continue
        mean = sum(members) / n
        if estimator == "rloo":
            out.append(r - (sum(members) - r) / (n - 1))
        elif estimator == "drgrpo":
            out.append(r - mean)
        else:
            std = (sum((m - mean) ** 2 for m in members) / (n - 1)) ** 0.5
            out.append((r - mean) / (std + 1e-6))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.integers(0, 3)), min_size=1, max_size=16),
       st.sampled_from(["grpo", "drgrpo", "rloo"]))
def test_group_advantages_match_loop_reference(rows, estimator):
    rewards = [r for r, _ in rows]
    groups = [g for _, g in rows]
    got = group_advantages(torch.tensor(rewards), torch.tensor(groups), estimator)
    torch.testing.assert_close(got, torch.tensor(_loop_reference(rewards, groups, estimator)), atol=1e-4, rtol=1e-4)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(torch.zeros(2), torch.zeros(2), "ppo")


def _sample(p, t, group, reward=0.0, layers=2, topk=2, version=0):
    return Sample(prompt_tokens=list(range(1, p + 1)), response_tokens=list(range(50, 50 + t)),
                  rollout_log_probs=-torch.arange(1, t + 1).float(),
                  routed_experts=torch.randint(0, 8, (p + t - 1, layers, topk), dtype=torch.uint8),
                  reward=reward, group_index=group, policy_version=version)


def test_collate_alignment():
    samples = [_sample(3, 2, 0, 1.0), _sample(2, 4, 0, 0.0)]
    batch = collate(samples)
    assert batch.tokens.shape == (2, 6)
    assert batch.tokens[0].tolist() == [1, 2, 3, 50, 51, 0]
    assert batch.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 0]
    assert batch.loss_mask[1].tolist() == [0, 0, 1, 1, 1, 1]
    assert batch.rollout_log_probs[0, 3:5].tolist() == [-1.0, -2.0]
    assert batch.attention_lengths.tolist() == [5, 6]
    assert batch.routed_experts.shape == (2, 6, 2, 2)
    assert torch.equal(batch.routed_experts[1, :5], samples[1].routed_experts.long())
    assert (batch.routed_experts[0, 4:] == NO_ROUTE).all() and (batch.routed_experts[1, 5:] == NO_ROUTE).all()
    assert batch.advantages[0] > 0 > batch.advantages[1]
    sub = batch.select(slice(1, 2))
    assert sub.batch_size == 1 and sub.tokens[0].tolist() == batch.tokens[1].tolist()


def test_flagged_groups_are_dropped_whole_and_never_collated():
    a, b, c = _sample(2, 2, 0), _sample(2, 2, 0), _sample(2, 2, 1)
    b.status = SampleStatus.FLAGGED
    b.metadata["flag_reasons"] = ["routes length 2 != 3"]
    kept = drop_unusable_groups([a, b, c])
    assert kept == [c]
    with pytest.raises(ValueError, match="FLAGGED"):
        collate([a, b])


def test_stale_groups_are_dropped():
    old, new = _sample(2, 2, 0, version=1), _sample(2, 2, 1, version=4)
    assert drop_unusable_groups([old, new], current_version=5, max_policy_lag=2) == [new]


def test_collate_errors():
    a, b = _sample(2, 2, 0), _sample(2, 2, 0)
    b.rollout_log_probs = None
    with pytest.raises(ValueError, match="rollout_log_probs"):
        collate([a, b])
    with pytest.raises(ValueError, match="no samples"):
        collate([])
    with pytest.raises(ValueError, match="Sample.routed_experts"):
        Sample(prompt_tokens=[1, 2], response_tokens=[3], routed_experts=torch.zeros(3, 1, 1))


def test_collate_refuses_log_probs_that_do_not_match_their_response_even_when_the_totals_agree():
    a, b = _sample(2, 3, 0), _sample(2, 3, 0)
    a.rollout_log_probs, b.rollout_log_probs = -torch.ones(4), -torch.ones(2)  # 6 values for 6 tokens, misplaced
    with pytest.raises(ValueError, match=r"samples \[0, 1\]: rollout_log_probs must hold one value per response"):
        collate([a, b])


def test_collate_places_each_log_prob_on_its_own_token_with_an_empty_response_in_between():
    a, empty, c = _sample(3, 2, 0), _sample(4, 0, 0), _sample(1, 5, 1)
    batch = collate([a, empty, c])
    assert batch.loss_mask[1].sum() == 0 and batch.tokens[1].tolist() == [1, 2, 3, 4, 0, 0]
    assert batch.rollout_log_probs[0].tolist() == [0, 0, 0, -1, -2, 0]
    assert batch.rollout_log_probs[2].tolist() == [0, -1, -2, -3, -4, -5]
