"""The metrics both loops compute from what they train on, without engines or Ray."""

import pytest

from megatron_vespo.orchestration import async_loop, collect
from megatron_vespo.orchestration.collect import sample_metrics
from megatron_vespo.types import Sample, SampleStatus


def _sample(reward, n_tokens, status=SampleStatus.COMPLETED, version=0, versions=None):
    return Sample(prompt_tokens=[1, 2], response_tokens=list(range(n_tokens)), reward=reward, status=status,
                  policy_version=version, metadata={"weight_versions": versions or [str(version)]})


def test_sample_metrics_by_hand():
    samples = [_sample(1.0, 4, SampleStatus.TRUNCATED, version=2), _sample(0.0, 2, version=3),
               _sample(0.5, 6, SampleStatus.TRUNCATED, version=3), _sample(-1.0, 0, version=2)]
    m = sample_metrics(samples)
    assert m == {"rollout/reward_mean": 0.125, "rollout/reward_max": 1.0, "rollout/response_len_mean": 3.0,
                 "rollout/truncated_frac": 0.5, "rollout/sample_version_min": 2.0,
                 "rollout/sample_version_max": 3.0}
    with pytest.raises(ValueError, match="at least one sample"):
        sample_metrics([])


def test_both_loops_use_the_one_sample_metrics():
    """The async loop reports the sync loop's rollout/* keys from the same function (plus its own)."""
    assert async_loop.sample_metrics is collect.sample_metrics
    samples = [_sample(1.0, 3, versions=["1", "2"]), _sample(0.0, 3, version=2)]
    assert async_loop.multi_version_frac(samples) == 0.5
