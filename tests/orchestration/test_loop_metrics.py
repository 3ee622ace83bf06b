"""The metrics both loops compute from what they train on, without engines or Ray."""

import pytest

from megatron_vespo.orchestration import async_loop, collect, rollout_worker
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
    """The async loop reports the sync loop's rollout/* keys from the same function (plus its own);
    its batches are collated, and their metrics computed, by the rollout worker."""
    assert rollout_worker.sample_metrics is collect.sample_metrics
    assert rollout_worker.multi_version_frac is collect.multi_version_frac
    samples = [_sample(1.0, 3, versions=["1", "2"]), _sample(0.0, 3, version=2)]
    assert collect.multi_version_frac(samples) == 0.5


# ---------------------------------------------------------------- engine busy time (async/overlap_frac)
class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _HeldClient:
    """Engine client stand-in: a batched /generate that answers when the test releases it."""

    def __init__(self, url):
        self.url, self.outstanding, self.release = url, 0, None

    async def generate_many(self, prompts, params, *, group_indices, metadata):
        import asyncio

        self.release = asyncio.Event()
        await self.release.wait()
        return [Sample(prompt_tokens=list(p), response_tokens=[7], group_index=g)
                for p, g in zip(prompts, group_indices)]


def test_engine_busy_time_counts_overlapping_requests_once_per_engine():
    from megatron_vespo.rollout.router import EngineBusyTime

    clock = _Clock()
    busy = EngineBusyTime(2, clock=clock)
    with busy.during(0):
        clock.t = 1.0
        with busy.during(0):  # a second request on the same engine: the engine is no busier
            clock.t = 3.0
        assert busy.totals() == [3.0, 0.0]  # the open interval counts
        clock.t = 4.0
    clock.t = 10.0  # idle: nothing accrues
    with busy.during(1):
        clock.t = 12.0
    assert busy.totals() == [4.0, 2.0]
    with busy.during(0):
        clock.t = 13.0
        assert busy.totals(now=12.5) == [4.5, 2.0]  # one clock reading for the snapshot and its clock_s


def test_overlap_frac_is_engine_generating_time_not_groups_in_flight():
    """Two engines, one group: only the engine holding the request is busy, so a step it spans
    entirely reads 0.5 (the old metric, 'any group in flight', read 1.0); the time before the
    request is sent (a group admitted but waiting) is not counted."""
    import asyncio

    from megatron_vespo.rollout.router import EngineRouter

    async def scenario():
        clock = _Clock()
        clients = [_HeldClient("http://e0"), _HeldClient("http://e1")]
        router = EngineRouter(clients)
        router.busy = type(router.busy)(2, clock=clock)
        before = {"engine_busy_s": router.busy.totals(), "clock_s": clock.t, "samples": 0}
        clock.t = 1.0  # the group waits 1 s before its request is sent
        task = asyncio.ensure_future(router.generate_groups([[1, 2]], {"max_new_tokens": 1}, 2))
        while clients[0].release is None:
            await asyncio.sleep(0)
        clock.t = 4.0  # engine 0 generates for 3 s
        clients[0].release.set()
        samples = await task
        after = {"engine_busy_s": router.busy.totals(), "clock_s": clock.t, "samples": len(samples)}
        return before, after, clients

    before, after, clients = asyncio.run(scenario())
    assert clients[1].release is None  # the whole group went to one engine
    m = async_loop.overlap_metrics(before, after)
    assert m == {"async/gen_busy_during_train_s": 1.5, "async/overlap_frac": 0.375,
                 "async/samples_generated_during_train": 2}
