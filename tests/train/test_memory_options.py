"""H100 memory options: model.recompute_* and train.optimizer_cpu_offload / use_precision_aware_optimizer.

The fields carry megatron-core 0.16.1 names and must reach ``TransformerConfig`` /
``OptimizerConfig``; combinations Megatron rejects fail at config load with the field named.
"""

import pytest
import torch
from pydantic import ValidationError

from megatron_vespo.config.base import ConfigError
from megatron_vespo.models.config import ModelConfig
from megatron_vespo.train.config import ParallelConfig, TrainConfig

FULL = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


# ---------------------------------------------------------------- validation (no Megatron needed)
@pytest.mark.parametrize("fields,match", [
    ({"recompute_granularity": "full"}, "needs model.recompute_method"),
    ({"recompute_granularity": "full", "recompute_method": "uniform"}, "recompute_num_layers"),
    ({"recompute_granularity": "selective", "recompute_num_layers": 1}, "selective"),
    ({"recompute_method": "block", "recompute_num_layers": 2}, "recompute_granularity is not"),
    ({"recompute_granularity": "partial"}, "recompute_granularity"),
    ({"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 0}, "num_layers"),
])
def test_recompute_combinations_megatron_rejects(fields, match):
    with pytest.raises(ValidationError, match=match):
        ModelConfig(**fields)


def test_recompute_set_twice_is_rejected():
    with pytest.raises(ValidationError, match="one place per field"):
        ModelConfig(**FULL, transformer_overrides={"recompute_granularity": "full"})


def test_recompute_fields_and_stage_bound():
    assert ModelConfig().recompute_fields() == {}
    assert ModelConfig(recompute_granularity="selective").recompute_fields() == {"recompute_granularity": "selective"}
    assert ModelConfig(**FULL).recompute_fields(layers_per_stage=2) == FULL
    with pytest.raises(ValueError, match="recompute_num_layers=3 exceeds the 2 decoder layers"):
        ModelConfig(**{**FULL, "recompute_num_layers": 3}).recompute_fields(layers_per_stage=2)


def test_optimizer_options_validation():
    assert TrainConfig(optimizer_cpu_offload=True).optimizer_offload_fraction == 1.0  # Megatron-LM's CLI default
    with pytest.raises(ValidationError, match="optimizer_cpu_offload is false"):
        TrainConfig(optimizer_offload_fraction=0.5)
    with pytest.raises(ValidationError, match="optimizer_offload_fraction"):
        TrainConfig(optimizer_cpu_offload=True, optimizer_offload_fraction=1.5)
    for name in ("use_precision_aware_optimizer", "optimizer_cpu_offload"):
        with pytest.raises(ConfigError, match=f"train.{name} needs the distributed optimizer"):
            TrainConfig(**{name: True}).check_optimizer_layout(ParallelConfig(use_distributed_optimizer=False))


def test_job_config_checks_optimizer_layout():
    from megatron_vespo.config.job import JobConfig

    with pytest.raises((ConfigError, ValidationError), match="parallel.use_distributed_optimizer=true"):
        JobConfig(train={"optimizer_cpu_offload": True}, parallel={"use_distributed_optimizer": False})


# ---------------------------------------------------------------- reaching Megatron (CPU, 1 process)
def _actor(model_kw=None, train_kw=None, routing="R3"):
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.routing.config import RoutingReplayConfig
    from megatron_vespo.train.actor import MegatronActor

    tc = dict(rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2, lr=1e-3, **(train_kw or {}))
    return MegatronActor(ModelConfig(preset="tiny", **(model_kw or {})), ParallelConfig(), TrainConfig(**tc),
                         LossConfig(name="vespo"), RoutingReplayConfig(mode=routing), init="layout_invariant")


@pytest.fixture
def megatron_process_group(parallel_teardown):
    if torch.cuda.is_available():
        pytest.skip("CPU test")


def test_full_recompute_reaches_megatron_and_trains_the_same(megatron_process_group):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from actor_cases import make_batch

    ref_actor = _actor()
    ref = ref_actor.train_on_rollout(make_batch(ref_actor))
    actor = _actor(FULL)
    cfg = actor.model[0].config
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 1)
    got = actor.train_on_rollout(make_batch(actor))
    assert got[0]["routing/replayed_recomputes"] > 0  # the backward really re-ran the layers
    for a, b in zip(ref, got):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


class _Captured(Exception):
    pass


def test_optimizer_options_reach_optimizer_config(megatron_process_group, monkeypatch):
    import megatron.core.optimizer as mopt

    seen = {}

    def capture(config, *a, **k):
        seen["config"] = config
        raise _Captured

    monkeypatch.setattr(mopt, "get_megatron_optimizer", capture)
    with pytest.raises(_Captured):
        _actor(train_kw={"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.25}, routing="disabled")
    cfg = seen["config"]
    assert cfg.optimizer_cpu_offload is True and cfg.optimizer_offload_fraction == 0.25
    assert cfg.use_distributed_optimizer is True  # CPU offload lives in DistributedOptimizer, even at DP 1
    assert cfg.use_precision_aware_optimizer is False


def test_precision_aware_without_transformer_engine_is_a_config_error(megatron_process_group):
    from megatron_vespo.utils.imports import is_available

    if is_available("transformer_engine.pytorch.optimizers"):
        pytest.skip("Transformer Engine is installed")
    with pytest.raises(ConfigError, match="train.use_precision_aware_optimizer needs Transformer Engine"):
        _actor(train_kw={"use_precision_aware_optimizer": True, "optimizer_cpu_offload": True}, routing="disabled")


@pytest.mark.gpu
def test_slime_memory_recipe_trains_on_gpu():
    """Full recompute + CPU Adam + precision-aware optimizer (slime's 30B recipe) on a tiny model."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from actor_cases import make_batch

    actor = _actor(FULL, {"optimizer_cpu_offload": True, "use_precision_aware_optimizer": True})
    out = actor.train_on_rollout(make_batch(actor))
    assert all(m["update_ok"] == 1.0 and torch.isfinite(torch.tensor(m["loss"])) for m in out)
