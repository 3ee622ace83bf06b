"""One NaN reward flags its sample and drops its group (sync and async), counted in the metrics."""

import asyncio
import math

from megatron_vespo.buffer import drop_unusable_groups
from megatron_vespo.data import Prompt, PromptDataset
from megatron_vespo.orchestration.collect import collect_rollout
from megatron_vespo.orchestration.rollout_worker import RolloutWorker
from megatron_vespo.rewards import score_samples
from megatron_vespo.rollout.config import RolloutConfig
from megatron_vespo.types import Sample, SampleStatus

N = 2
POISON = 3  # prompt index whose reward is NaN


def reward(sample, label):
    return float("nan") if sample.metadata.get("prompt_index") == POISON else 0.5


class Router:
    clients: list = []

    async def generate(self, tokens, sampling, group_index, metadata):
        return Sample(list(tokens), [1, 6], policy_version=0, group_index=group_index, metadata=dict(metadata))

    async def generate_groups(self, prompts, sampling, n_samples_per_prompt, *, first_group=0, metadata=None,
                              batched=True):
        """EngineRouter.generate_groups: n samples per prompt, prompt-major, group = first_group + prompt index."""
        return [await self.generate(p, sampling, first_group + g, (metadata or [{}] * len(prompts))[g] or {})
                for g, p in enumerate(prompts) for _ in range(n_samples_per_prompt)]


def dataset(n=8):
    return PromptDataset([Prompt(tokens=[7, i], label=1, index=i) for i in range(n)], seed=0)


def test_score_samples_flags_non_finite_rewards():
    samples = [Sample([1], [2], group_index=0, metadata={"prompt_index": i}) for i in (1, POISON, 2)]
    assert score_samples(samples, reward, [None] * 3) == 1
    assert [s.status for s in samples] == [SampleStatus.COMPLETED, SampleStatus.FLAGGED, SampleStatus.COMPLETED]
    assert samples[1].reward == 0.0 and "non-finite reward nan" in samples[1].metadata["flag_reasons"]
    samples[2].group_index = 1
    assert drop_unusable_groups(samples) == [samples[2]]  # the whole group of the NaN goes


def test_sync_collect_drops_the_group_and_counts_it():
    ds = dataset()
    cfg = RolloutConfig(n_samples_per_prompt=N)
    samples, metrics = collect_rollout(Router(), asyncio.run, ds, cfg, 8 * N - 2 * N, reward)
    assert POISON not in {s.metadata["prompt_index"] for s in samples}
    assert all(math.isfinite(s.reward) for s in samples)
    assert metrics["rollout/reward_nonfinite"] == N and metrics["rollout/samples_dropped"] == N


def test_async_worker_drops_the_group_and_counts_it():
    async def go():
        w = RolloutWorker(RolloutConfig(n_samples_per_prompt=N), ["http://fake"], dataset(), "token_class",
                          groups_per_batch=7, max_policy_lag=0, start_version=0, buffer_groups=7,
                          max_inflight_groups=8, router=Router())
        w.reward_fn = reward
        await w.start()
        res = await w.take(7, current_version=0, timeout_s=5)
        await w.stop()
        return w, res
    w, res = asyncio.run(go())
    assert len(res["groups"]) == 7
    assert POISON not in {g[0].metadata["prompt_index"] for g in res["groups"]}
    assert w.counters["reward_nonfinite"] == N and res["metrics"]["rollout/reward_nonfinite"] == N
