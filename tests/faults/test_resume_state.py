"""Loop state that shapes the future is saved and continued: the router's seed / round-robin counters
(sync loop and the async rollout worker). The end-to-end proof is ``test_kill_resume.py``; these
cases pin the pieces without a training run."""

import asyncio

import pytest

from megatron_vespo.data import Prompt, PromptDataset
from megatron_vespo.orchestration.rollout_worker import RolloutWorker
from megatron_vespo.rollout.config import RolloutConfig, SamplingConfig
from megatron_vespo.rollout.router import EngineRouter
from megatron_vespo.types import Sample


class StubClient:
    """Records (engine, seed) of every request; answers at once."""

    def __init__(self, url: str, log: list):
        self.url, self.log, self.outstanding = url, log, 0

    async def generate(self, prompt_tokens, sampling, group_index=0, metadata=None, **kw):
        self.log.append((self.url, sampling["sampling_seed"]))
        return Sample(list(prompt_tokens), [1, 5], policy_version=0, group_index=group_index,
                      metadata=dict(metadata or {}))

    async def generate_many(self, prompts, params, group_indices, metadata=None):
        """The batched path (one /generate per engine per rollout batch): one record per row."""
        return [await self.generate(p, sp, group_index=g, metadata=md)
                for p, sp, g, md in zip(prompts, params, group_indices, metadata or [None] * len(prompts))]

    async def aclose(self):
        pass


SAMPLING = SamplingConfig(max_new_tokens=2, sampling_seed=40)


def _router(log, policy="round_robin"):
    return EngineRouter([StubClient(f"http://e{i}", log) for i in range(3)], policy)


def test_a_restored_router_continues_seeds_and_engine_order():
    log = []
    whole = _router(log)
    asyncio.run(whole.generate_batch([[1], [2]], SAMPLING, 4))  # 8 requests
    asyncio.run(whole.generate_batch([[3]], SAMPLING, 3))
    uninterrupted = log[8:]
    log.clear()
    first = _router(log)
    asyncio.run(first.generate_batch([[1], [2]], SAMPLING, 4))
    state = first.state_dict()
    assert state == {"seed_counter": 8, "rr_counter": 8}
    resumed = _router(log)
    resumed.load_state_dict(state)
    log.clear()
    asyncio.run(resumed.generate_batch([[3]], SAMPLING, 3))
    assert log == uninterrupted == [("http://e2", 48), ("http://e0", 49), ("http://e1", 50)]


@pytest.mark.parametrize("bad", [{"seed_counter": -1}, {"rr_counter": "3"}, {"seed_counter": True}])
def test_a_bad_router_state_is_named(bad):
    with pytest.raises(ValueError, match="router state"):
        _router([]).load_state_dict(bad)


def _worker(router, router_state=None):
    ds = PromptDataset([Prompt(tokens=[7, i], label=1, index=i) for i in range(20)], seed=0)
    cfg = RolloutConfig(n_samples_per_prompt=2, sampling=SAMPLING)
    return RolloutWorker(cfg, ["http://e0"], ds, "token_class", groups_per_batch=2, max_policy_lag=0, start_version=0,
                         buffer_groups=2, max_inflight_groups=2, router=router, router_state=router_state)


def test_the_async_worker_saves_and_continues_the_router_counters():
    async def go():
        log = []
        w = _worker(_router(log))
        await w.start()
        for _ in range(50):
            await asyncio.sleep(0)
        state = await w.state_dict()
        await w.stop()
        assert state["router"]["seed_counter"] == len(log) == 4  # 2 groups x 2 samples (buffer bound)
        log2 = []
        w2 = _worker(_router(log2), router_state=state["router"])
        await w2.start()
        for _ in range(50):
            await asyncio.sleep(0)
        await w2.stop()
        assert sorted(seed for _, seed in log2) == [44, 45, 46, 47]  # not 40-43 again
    asyncio.run(go())
