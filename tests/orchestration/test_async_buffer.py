"""Staleness filter, admission control and the rollout worker's bookkeeping, without Ray or engines.

The worker runs on a plain asyncio loop against a fake router whose ``generate`` tags each
sample with the engine version current when its first token is produced (what SGLang's
``weight_versions`` and our protocol give), so the lag guarantee can be checked under random
timings, in-place weight updates and out-of-order completion.
"""

import asyncio
import math
import random

import pytest
import torch

from megatron_vespo.config.base import ConfigError
from megatron_vespo.config.job import JobConfig
from megatron_vespo.data import Prompt, PromptDataset
from megatron_vespo.orchestration.async_buffer import (
    GroupBuffer,
    StalenessGate,
    group_version,
    lag_metrics,
    policy_lag,
)
from megatron_vespo.orchestration.async_loop import async_bounds, overlap_metrics
from megatron_vespo.orchestration.rollout_worker import RolloutWorker, RolloutWorkerError
from megatron_vespo.orchestration.weight_load import PausedDiskLoad
from megatron_vespo.rollout.config import RolloutConfig
from megatron_vespo.rollout.protocol import response_to_sample
from megatron_vespo.types import Sample, SampleStatus

N = 2  # samples per prompt


def _group(version, n=N, gid=0, prompt=0):
    return [Sample([1, 2], [3], policy_version=v, group_index=gid, metadata={"prompt_index": prompt})
            for v in ([version] * n if isinstance(version, int) else version)]


# ---------------------------------------------------------------- pure logic
def test_group_lag_is_counted_from_its_oldest_sample():
    g = _group([5, 3])
    assert group_version(g) == 3
    assert policy_lag(g, 6) == 3
    with pytest.raises(ValueError, match="newer than the trainer"):
        policy_lag(_group(7), 6)


def test_sample_spanning_an_update_is_tagged_with_its_first_tokens_version():
    resp = {"output_ids": [4, 5, 6], "meta_info": {
        "finish_reason": {"type": "stop"}, "weight_version": "4",
        "weight_versions": [{"version": "3", "start": 0, "end": 2}, {"version": "4", "start": 2, "end": 3}]}}
    s = response_to_sample(resp, [1, 2], expect_log_probs=False)
    assert s.policy_version == 3  # not the latest version (4) that SGLang reports in weight_version


def test_take_drops_stale_groups_and_is_all_or_nothing():
    buf = GroupBuffer(capacity=5)
    for gid, v in enumerate([0, 2, 1, 3]):
        buf.put(_group(v, gid=gid))
    res = buf.take(2, current_version=3, max_policy_lag=1)
    assert res.stale_groups == 2 and res.stale_samples == 2 * N  # versions 0 and 1 have lag 3, 2
    assert [g[0].group_index for g in res.groups] == [1, 3]  # FIFO among the fresh ones
    buf.put(_group(3, gid=7))
    res = buf.take(2, current_version=3, max_policy_lag=1)
    assert res.groups == [] and len(buf) == 1  # one usable group stays for the next take
    with pytest.raises(RuntimeError, match="overflow"):
        for _ in range(5):
            buf.put(_group(3))


def test_lag_metrics_histogram():
    m = lag_metrics([_group(4), _group(3), _group(3)], current_version=4, max_policy_lag=2)
    assert m["async/lag_hist_0"] == N and m["async/lag_hist_1"] == 2 * N and m["async/lag_hist_2"] == 0
    assert m["async/lag_mean"] == pytest.approx(2 / 3) and m["async/lag_max"] == 1


def test_gate_budget_over_versions():
    b, lag = 4, 1
    gate = StalenessGate(b, lag, start_version=10, max_inflight=100, buffer_capacity=100)
    assert gate.capacity(10, buffered=0) == (lag + 1) * b  # waiting for the first batch
    for _ in range(8):
        gate.on_started()
        gate.on_accepted()
    assert gate.capacity(10, buffered=8) == 0
    # the trainer took a batch (buffered 4) and trains at version 10: nothing more may start
    assert gate.capacity(10, buffered=4) == 0
    assert gate.capacity(11, buffered=4) == b  # after its sync: one more batch
    gate.on_stale(2)  # two groups dropped as stale give their slots back
    assert gate.capacity(11, buffered=2) == b + 2
    small = StalenessGate(b, lag, 0, max_inflight=3, buffer_capacity=5)
    assert small.capacity(0, buffered=0) == 3  # in-flight bound
    assert small.capacity(0, buffered=3) == 2  # buffer bound
    with pytest.raises(ValueError, match="never pull a full batch"):
        StalenessGate(b, lag, 0, max_inflight=3, buffer_capacity=b - 1)


def test_async_bounds_defaults_and_errors():
    job = JobConfig.model_validate({"train": {"rollout_batch_size": 32, "mini_batch_size": 8},
                                    "rollout": {"n_samples_per_prompt": 4}, "loop": {"max_policy_lag": 2}})
    assert async_bounds(job) == (8, 24, 8)
    job.loop.buffer_groups = 7
    with pytest.raises(ConfigError, match="loop.buffer_groups"):
        async_bounds(job)
    job.loop.buffer_groups = None
    job.loop.pause_mode, job.weight_sync.kind, job.rollout.engine = "in_place", "distributed", "sglang"
    with pytest.raises(ConfigError, match="pause_mode"):
        async_bounds(job)


def test_overlap_is_mean_engine_busy_time_over_the_bracketed_interval():
    m = overlap_metrics({"engine_busy_s": [10.0, 4.0], "clock_s": 100.0, "samples": 40},
                        {"engine_busy_s": [11.0, 4.0], "clock_s": 102.0, "samples": 48})
    # engine 0 generated 1 s of the 2 s step, engine 1 not at all: 0.5 s per engine, a quarter of the step
    assert m == {"async/gen_busy_during_train_s": 0.5, "async/overlap_frac": 0.25,
                 "async/samples_generated_during_train": 8}
    unknown = overlap_metrics({"engine_busy_s": [], "clock_s": 0.0, "samples": 0},
                              {"engine_busy_s": [], "clock_s": 1.0, "samples": 0})
    assert math.isnan(unknown["async/overlap_frac"])  # a router that measures nothing reports no overlap


# ---------------------------------------------------------------- worker with a fake engine
class FakeRouter:
    """Engine stand-in: version at the first token, optional hold, abort, flag and failure per prompt."""

    def __init__(self, delay=lambda: 0.0):
        self.clients, self.version, self.calls, self.delay = [], 0, [], delay
        self.hold = None
        self.abort_once, self.flag, self.fail = set(), set(), False

    async def generate(self, tokens, sampling, group_index, metadata):
        idx = metadata["prompt_index"]
        self.calls.append(idx)
        await asyncio.sleep(self.delay())
        v = self.version  # first token
        if self.hold is not None:
            await self.hold.wait()
        await asyncio.sleep(self.delay())
        if self.fail:
            raise RuntimeError("engine exploded")
        status, md = SampleStatus.COMPLETED, dict(metadata)
        if idx in self.abort_once and self.calls.count(idx) <= N:  # the first attempt only
            status = SampleStatus.ABORTED
        if idx in self.flag:
            status, md["flag_reasons"] = SampleStatus.FLAGGED, ["routes misaligned"]
        return Sample(list(tokens), [1, 6], policy_version=v, group_index=group_index, status=status, metadata=md)


    async def generate_groups(self, prompts, sampling, n, *, first_group=0, metadata=None, batched=True):
        """As ``EngineRouter.generate_groups``: n samples per prompt, prompt-major (one call per sample here)."""
        return list(await asyncio.gather(*(self.generate(p, sampling, first_group + g, (metadata or [{}])[g])
                                           for g, p in enumerate(prompts) for _ in range(n))))


def _worker(router, *, b=2, lag=1, inflight=8, buffer=None, pending=(), num_prompts=50, version=0):
    ds = PromptDataset([Prompt(tokens=[7, i], label=1, index=i) for i in range(num_prompts)], seed=0)
    cfg = RolloutConfig(n_samples_per_prompt=N)
    return RolloutWorker(cfg, ["http://fake"], ds, "token_class", groups_per_batch=b, max_policy_lag=lag,
                         start_version=version, buffer_groups=buffer or (lag + 1) * b, max_inflight_groups=inflight,
                         pending_prompts=pending, router=router)


async def _settle():
    """Let every runnable task run to its next real wait (the fake engine never sleeps here)."""
    for _ in range(200):
        await asyncio.sleep(0)


def test_worker_fills_the_buffer_to_its_bound_and_waits():
    async def go():
        router = FakeRouter()
        w = _worker(router, b=2, lag=1)
        await w.start()
        await _settle()
        assert w.counters["groups"] == 4 and len(router.calls) == 4 * N  # (L + 1) x B, then it stops
        res = await w.take(2, current_version=0, timeout_s=1)
        assert len(res["groups"]) == 2 and res["metrics"]["async/buffer_groups"] == 4
        assert all(s.reward == 0.5 for g in res["groups"] for s in g)  # token_class: [1, 6] vs label 1
        await _settle()
        assert w.counters["groups"] == 4  # training at version 0: no newer policy to generate with
        await w.set_version(1)
        await _settle()
        assert w.counters["groups"] == 6
        stats = await w.stats()
        assert stats["buffered"] == 4 and stats["inflight"] == 0 and stats["samples"] == 6 * N
        await w.stop()
    asyncio.run(go())


def test_a_collated_take_is_the_trainers_collation_of_the_same_groups_with_their_metrics():
    """take(collate_batch=True): the worker collates (only tensors cross to the trainer); the batch and
    the lag / sample metrics are what the trainer computed from the groups before."""
    from megatron_vespo.buffer import collate
    from megatron_vespo.orchestration.async_buffer import lag_metrics
    from megatron_vespo.orchestration.collect import multi_version_frac, sample_metrics

    async def go():
        router = FakeRouter()
        w = _worker(router, b=2, lag=1)
        await w.start()
        await _settle()
        plain = await w.take(2, current_version=0, timeout_s=1)
        await w.set_version(1)
        await _settle()
        res = await w.take(2, current_version=1, timeout_s=1, collate_batch=True)
        assert res["groups"] is None and res["batch"] is not None
        direct = w._collated(plain["groups"], 0, {"kept": 1.0})  # what a collated take of those groups returns
        await w.stop()
        return plain, res, direct

    plain, res, direct = asyncio.run(go())
    assert "train_batch" not in plain  # the default answer is unchanged: groups
    samples = [x for g in plain["groups"] for x in g]
    ref = collate(samples)
    for field in ("tokens", "loss_mask", "attention_lengths", "advantages", "rollout_log_probs", "group_index"):
        a, b = getattr(direct["train_batch"], field), getattr(ref, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    expected = {"kept": 1.0, **lag_metrics(plain["groups"], 0, 1), **sample_metrics(samples),
                "async/multi_version_frac": multi_version_frac(samples)}
    assert direct["metrics"] == expected and direct["groups"] is None
    # through take: the batch of the groups it took, with the interval metrics as well
    assert res["train_batch"].tokens.shape[0] == 2 * N
    assert set(expected) - {"kept"} <= set(res["metrics"]) and "async/buffer_fill" in res["metrics"]
    assert res["metrics"]["async/lag_max"] <= 1 and res["metrics"]["rollout/reward_mean"] == 0.5


class BatchRecordingRouter(FakeRouter):
    """FakeRouter that records how many groups each ``generate_groups`` call carried."""

    def __init__(self):
        super().__init__()
        self.batches = []

    async def generate_groups(self, prompts, sampling, n, *, first_group=0, metadata=None, batched=True):
        self.batches.append((len(prompts), first_group))
        return await super().generate_groups(prompts, sampling, n, first_group=first_group, metadata=metadata,
                                             batched=batched)


def test_groups_admitted_together_go_out_as_one_batched_generation():
    """Regression (issue 15): one task per group reached the embedded engine apart, which then ran
    each rollout batch as 8 + 56 rows; everything the gate admits at once is one request now."""
    async def go():
        router = BatchRecordingRouter()
        w = _worker(router, b=2, lag=1)
        await w.start()
        await _settle()
        assert router.batches == [(4, 0)]  # (L + 1) x B groups, ids 0..3, one call
        await w.take(2, current_version=0, timeout_s=1)
        await w.set_version(1)
        await _settle()
        assert router.batches == [(4, 0), (2, 4)]
        res = await w.take(4, current_version=1, timeout_s=1)
        groups = sorted(g[0].group_index for g in res["groups"])
        assert groups == [2, 3, 4, 5] and all(len(g) == N for g in res["groups"])
        assert all(s.group_index == g[0].group_index for g in res["groups"] for s in g)
        await w.stop()
    asyncio.run(go())


def test_aborted_groups_are_regenerated_and_flagged_groups_dropped():
    async def go():
        router = FakeRouter()
        order = _worker(router).dataset._order(0)
        router.abort_once, router.flag = {order[0]}, {order[1]}
        w = _worker(router, b=2, lag=0)
        await w.start()
        res = await w.take(2, current_version=0, timeout_s=2)
        assert w.counters["aborted_groups"] == 1 and w.counters["flagged_samples"] == N
        assert router.calls.count(order[0]) == 2 * N  # generated again
        assert router.calls.count(order[1]) == N  # flagged: dropped, not retried
        prompts = {g[0].metadata["prompt_index"] for g in res["groups"]}
        assert order[1] not in prompts
        assert all(s.status == SampleStatus.COMPLETED for g in res["groups"] for s in g)
        await w.stop()
    asyncio.run(go())


def test_state_dict_lists_pending_prompts_and_a_resumed_worker_generates_them_first():
    async def go():
        router = FakeRouter()
        w = _worker(router, b=2, lag=1, inflight=3)
        router.hold = asyncio.Event()
        await w.start()
        await _settle()
        state = await w.state_dict()
        assert len(state["pending_prompts"]) == 3  # in flight
        assert state["offset"] == 3 and state["size"] == 50
        await w.stop()
        router2 = FakeRouter()
        w2 = _worker(router2, pending=state["pending_prompts"], inflight=1)
        w2.dataset.load_state_dict(state)
        await w2.start()
        await _settle()
        first = list(dict.fromkeys(router2.calls))[:4]
        order = w2.dataset._order(0)
        assert first == state["pending_prompts"] + [order[3]]  # pending first, then where the data set stood
        await w2.stop()
    asyncio.run(go())


def test_a_batch_taken_ahead_stays_pending_until_reported_trained():
    """The trainer asks for batch k+1 before batch k has trained (async_loop._pull); a checkpoint
    taken in between must still list batch k+1's prompts, or a resumed run would skip them."""
    async def go():
        w = _worker(FakeRouter(), b=2, lag=1)
        await w.start()
        await _settle()
        first = await w.take(2, current_version=0, timeout_s=1, hold=True)
        ahead = await w.take(2, current_version=1, timeout_s=1, hold=True)  # taken during batch 0's update
        ids = [[g[0].metadata["prompt_index"] for g in r["groups"]] for r in (first, ahead)]
        assert first["batch"] != ahead["batch"]
        snap = await w.snapshot(trained=first["batch"])  # after batch 0 trained: batch 1 is not
        pending = snap["state"]["pending_prompts"]
        assert pending[:2] == ids[1] and not set(ids[0]) & set(pending)
        snap = await w.snapshot(trained=ahead["batch"])
        assert not set(ids[0] + ids[1]) & set(snap["state"]["pending_prompts"])
        await w.set_version(1)  # admission for two more groups
        await _settle()
        plain = await w.take(2, current_version=1, timeout_s=1)  # without hold: gone from the state at once
        taken = {g[0].metadata["prompt_index"] for g in plain["groups"]}
        assert taken and not taken & set((await w.state_dict())["pending_prompts"])
        await w.stop()
    asyncio.run(go())


def test_generation_error_reaches_the_trainer():
    async def go():
        router = FakeRouter()
        router.fail = True
        w = _worker(router)
        await w.start()
        with pytest.raises(RolloutWorkerError, match="engine exploded"):
            await w.take(2, current_version=0, timeout_s=2)
        await w.stop()
    asyncio.run(go())


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_no_trained_group_exceeds_the_lag_under_random_timing(lag):
    """A simulated trainer with in-place updates: every taken group has lag <= L, the trainer never
    starves, and with L = 0 nothing is generated while it trains."""
    rng = random.Random(lag)

    async def go():
        router = FakeRouter(delay=lambda: rng.choice([0.0, 0.0, 0.001, 0.004]))
        w = _worker(router, b=3, lag=lag, inflight=5, num_prompts=200)
        await w.start()
        version, lags = 0, []
        for _ in range(25):
            res = await w.take(3, current_version=version, timeout_s=5)
            assert len(res["groups"]) == 3
            lags += [policy_lag(g, version) for g in res["groups"]]
            calls_before = len(router.calls)
            await asyncio.sleep(rng.choice([0.0, 0.002, 0.006]))  # training
            if lag == 0:
                assert len(router.calls) == calls_before
            version += 1
            router.version = version  # engines updated in place: in-flight requests keep going
            await w.set_version(version)
        assert max(lags) <= lag
        if lag:
            assert max(lags) == lag  # the overlap is real: some data came from before the last sync
        await w.stop()
    asyncio.run(go())


# ---------------------------------------------------------------- pause around the disk load
class _Recorder:
    def __init__(self, fail=False):
        self.log, self.fail = [], fail

    async def pause_generation(self, mode):
        self.log.append(("pause", mode))

    async def update_weights_from_disk(self, path, version, **kw):
        self.log.append(("load", path, version, kw["flush_cache"]))
        if self.fail:
            raise RuntimeError("load failed")

    async def continue_generation(self):
        self.log.append(("continue",))


class _Engines:
    def __init__(self, router):
        self.router = router

    def run(self, aw):
        return asyncio.run(aw)


@pytest.mark.parametrize("mode,flush", [("abort", True), ("in_place", False), ("retract", True)])
def test_disk_load_is_wrapped_in_pause_and_continue(mode, flush):
    rec = _Recorder()
    view = PausedDiskLoad(_Engines(rec), mode)
    view.run(view.router.update_weights_from_disk("/w/v000003", 3))
    assert rec.log == [("pause", mode), ("load", "/w/v000003", 3, flush), ("continue",)]
    failing = _Recorder(fail=True)
    view = PausedDiskLoad(_Engines(failing), mode)
    with pytest.raises(RuntimeError, match="load failed"):
        view.run(view.router.update_weights_from_disk("/w/v000004", 4))
    assert failing.log[-1] == ("continue",)  # generation resumes even when the load failed
