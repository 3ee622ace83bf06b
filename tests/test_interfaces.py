"""The real classes satisfy the protocols the package boundaries are typed with.

``rollout/interfaces.py`` (``Router``, ``Engines``) and ``train/interfaces.py`` (``Actor``) say
what the loop, the weight sync and the evaluator use; if a real class renames or drops one of
those members, the loops break where these checks fail first.
"""

import inspect

import pytest
import torch

from megatron_vespo.rollout.interfaces import Engines, Router
from megatron_vespo.train.interfaces import Actor


def _protocol_methods(proto) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(getattr(proto, name)) for name, v in vars(proto).items()
            if callable(v) and not name.startswith("_")}


def _check_signatures(proto, cls) -> None:
    """Every protocol method exists on ``cls`` and accepts the protocol's parameters by name."""
    for name, sig in _protocol_methods(proto).items():
        impl = inspect.signature(getattr(cls, name))
        for p in sig.parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            assert p.name in impl.parameters or any(q.kind == q.VAR_KEYWORD for q in impl.parameters.values()), \
                f"{cls.__name__}.{name} lacks parameter {p.name!r} of {proto.__name__}.{name}"


def test_engine_router_is_a_router():
    pytest.importorskip("httpx")
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.rollout.router import EngineRouter

    router = EngineRouter([SGLangClient("http://127.0.0.1:9")])
    assert isinstance(router, Router)
    _check_signatures(Router, EngineRouter)


def test_rollout_engines_are_engines():
    pytest.importorskip("httpx")
    from megatron_vespo.orchestration.engines import RolloutEngines
    from megatron_vespo.rollout.config import RolloutConfig

    engines = RolloutEngines(RolloutConfig(), "unused-model-path")  # not started: no engine, no router yet
    try:
        assert isinstance(engines, Engines)
        _check_signatures(Engines, RolloutEngines)
    finally:
        engines.stop()


def test_a_stand_in_missing_a_member_is_not_an_engine_router():
    class NoBroadcast:
        clients: list = []
        urls: list = []

        async def generate(self, prompt_tokens, sampling, **kwargs): ...

        async def generate_groups(self, prompts, sampling, n_samples_per_prompt, **kwargs): ...

    assert not isinstance(NoBroadcast(), Router)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test")
@pytest.mark.usefixtures("parallel_teardown")
def test_megatron_actor_is_an_actor():
    pytest.importorskip("megatron.core")
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.routing.config import RoutingReplayConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig

    actor = MegatronActor(ModelConfig(preset="tiny"), ParallelConfig(),
                          TrainConfig(rollout_batch_size=2, mini_batch_size=2, micro_batch_size=1),
                          LossConfig(), RoutingReplayConfig())
    assert isinstance(actor, Actor)
    _check_signatures(Actor, MegatronActor)
