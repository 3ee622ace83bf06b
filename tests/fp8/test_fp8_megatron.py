"""The FP8 mapping against megatron-core's own validation, on CPU.

megatron-core 0.16.1 validates FP8 fields in ``TransformerConfig.__post_init__``; for an MoE
model it asks Transformer Engine's version (``transformer_config.py:1599-1611``), which does not
exist on a CPU machine. Where noted, the TE version is supplied through megatron-core's own
version cache (``megatron.core.utils._te_version``) so the rest of Megatron's validation runs on
our fields. Recipe objects, FP8 contexts and FP8 parameters need TE + a GPU: ``test_fp8_gpu.py``.
"""

import dataclasses
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tests (GPU variants in test_fp8_gpu.py)")

from packaging.version import Version  # noqa: E402

from megatron_vespo.config.base import ConfigError  # noqa: E402
from megatron_vespo.fp8 import (  # noqa: E402
    RECIPES,
    FP8Config,
    FP8Environment,
    check_fp8_environment,
    check_fp8_job,
    fp8_ddp_kwargs,
    fp8_optimizer_kwargs,
    fp8_summary,
    fp8_transformer_overrides,
    is_fp8_tensor,
    to_high_precision,
)
from megatron_vespo.models.config import ModelConfig  # noqa: E402
from megatron_vespo.train.config import ParallelConfig  # noqa: E402


@pytest.fixture(scope="module")
def hf():
    from megatron_vespo.models.qwen3_moe import get_hf_config

    return get_hf_config(ModelConfig(preset="tiny-4l"))  # 4 MoE layers


@pytest.fixture
def te_version(monkeypatch):
    """Set the Transformer Engine version megatron-core's checks see (no TE on this machine)."""
    import megatron.core.utils as mu

    def set_(v):
        monkeypatch.setattr(mu, "_te_version", None if v is None else Version(v))
    return set_


def build(hf, parallel=None, **overrides):
    from megatron_vespo.models.qwen3_moe import hf_config_to_transformer_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # moe_grouped_gemm: what the Transformer Engine spec uses on GPU (its FP8 rule is stricter)
        return hf_config_to_transformer_config(hf, parallel or ParallelConfig(), params_dtype="bfloat16",
                                               moe_grouped_gemm=True, **overrides)


def full(recipe, **kw):
    return FP8Config(fp8="e4m3", fp8_recipe=recipe, fp8_param_gather=True,
                     first_last_layers_bf16=recipe != "delayed", **kw)


def test_every_mapped_name_is_a_megatron_field():
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    c = full("mxfp8", reuse_grad_buf_for_mxfp8_param_ag=True)
    for kwargs, cls in [(fp8_transformer_overrides(c), TransformerConfig),
                        (fp8_ddp_kwargs(c), DistributedDataParallelConfig),
                        (fp8_optimizer_kwargs(c), OptimizerConfig)]:
        names = {f.name for f in dataclasses.fields(cls)}
        assert kwargs and set(kwargs) <= names, set(kwargs) - names
    for fn in (fp8_transformer_overrides, fp8_ddp_kwargs, fp8_optimizer_kwargs):
        assert fn(FP8Config()) == {} and fn(None) == {}


@pytest.mark.parametrize("recipe", RECIPES)
def test_megatron_accepts_each_recipe(hf, te_version, recipe):
    from megatron.core.enums import Fp8Recipe

    te_version("2.9.0")
    c = full(recipe, fp8_wgrad=False, fp8_margin=1)
    tf = build(hf, **fp8_transformer_overrides(c))
    assert tf.fp8 == "e4m3" and tf.fp8_recipe == Fp8Recipe(recipe) and tf.fp8_param and not tf.fp8_wgrad
    assert tf.moe_router_dtype == "fp32" and tf.moe_grouped_gemm
    s = fp8_summary(tf)
    assert s["fp8/enabled"] == 1.0 and s["fp8/recipe"] == recipe and s["fp8/param"] is True
    # Megatron's own is_first_last_bf16_layer decides which layers stay in BF16
    assert s["fp8/bf16_layers"] == ([] if recipe == "delayed" else [0, 3])
    assert ("fp8/amax_history_len" in s) == (recipe == "delayed")
    if recipe == "delayed":
        assert (tf.fp8_amax_history_len, tf.fp8_amax_compute_algo, tf.fp8_margin) == (1024, "max", 1)


@pytest.mark.parametrize("recipe", RECIPES)
def test_megatron_ddp_and_optimizer_configs_accept_the_fp8_fields(recipe):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    reuse = recipe == "mxfp8"
    c = full(recipe, reuse_grad_buf_for_mxfp8_param_ag=reuse)
    ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, **fp8_ddp_kwargs(c))
    assert ddp.fp8_param_gather and ddp.reuse_grad_buf_for_mxfp8_param_ag == reuse
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = OptimizerConfig(bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True,
                              **fp8_optimizer_kwargs(c))
    assert opt.fp8_recipe == recipe
    assert not [w for w in caught if "reuse_grad_buf_for_mxfp8_param_ag" in str(w.message)]
    if recipe == "mxfp8":  # without buffer reuse Megatron warns about the extra memory
        with pytest.warns(UserWarning, match="reuse_grad_buf_for_mxfp8_param_ag"):
            OptimizerConfig(bf16=True, **fp8_optimizer_kwargs(full("mxfp8")))


@pytest.mark.parametrize("version", ["1.6.0", "1.10.0", "1.11.0", "2.0.0"])
def test_te_floor_for_moe_fp8_agrees_with_megatron(hf, te_version, version):
    te_version(version)
    try:
        build(hf, **fp8_transformer_overrides(FP8Config(fp8="hybrid")))
        megatron_ok = True
    except ValueError as exc:
        assert "transformer-engine>=" in str(exc)
        megatron_ok = False
    env = FP8Environment(cuda_available=True, capability=(9, 0), cuda_version="12.9", te_version=version)
    try:
        check_fp8_environment(FP8Config(fp8="hybrid"), env)
        ours_ok = True
    except ConfigError:
        ours_ok = False
    assert ours_ok == megatron_ok == (Version(version) >= Version("1.11.0"))


def test_megatron_rejects_what_our_config_rejects(hf, te_version):
    from megatron.core.distributed import DistributedDataParallelConfig

    te_version("2.9.0")
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer in BF16"):
        build(hf, fp8="e4m3", fp8_recipe="delayed", first_last_layers_bf16=True)
    with pytest.raises(ValueError, match="fp8_param must be used together with fp8 mode"):
        build(hf, fp8_param=True)
    with pytest.raises(AssertionError, match="Reuse grad buffer only when keeping params in MXFP8"):
        DistributedDataParallelConfig(reuse_grad_buf_for_mxfp8_param_ag=True)
    # layers kept in BF16 must fit a pipeline stage: Megatron and check_fp8_job agree (4 layers / PP2 = 2)
    c = FP8Config(fp8="e4m3", fp8_recipe="blockwise", first_last_layers_bf16=True, num_layers_at_end_in_bf16=3)
    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"num_layers_at_end_in_bf16 \(3\) must be between 0 and number of layers "
                                         r"per pipeline stage \(2\)"):
        build(hf, pp2, **fp8_transformer_overrides(c))
    with pytest.raises(ConfigError, match=r"fp8\.num_layers_at_end_in_bf16=3 exceeds .* = 2\)"):
        check_fp8_job(c, None, pp2, hf)
    ok = c.model_copy(update={"num_layers_at_end_in_bf16": 2})
    check_fp8_job(ok, None, pp2, hf)
    assert build(hf, pp2, **fp8_transformer_overrides(ok)).num_layers_at_end_in_bf16 == 2


def test_without_transformer_engine_megatron_stops_at_its_te_version_check(hf, te_version):
    # Where CPU validation ends without a TE version: transformer_config.py:1601 compares None
    # with a Version (MoE + FP8), which our builder reports as a rejected override.
    te_version(None)
    with pytest.raises(ConfigError, match="TransformerConfig override rejected") as exc:
        build(hf, **fp8_transformer_overrides(FP8Config(fp8="e4m3", fp8_recipe="blockwise")))
    assert isinstance(exc.value.__cause__, TypeError)


def test_tensor_helpers_are_identity_without_fp8_params():
    t = torch.randn(3, 4)
    assert not is_fp8_tensor(t) and to_high_precision(t) is t


# ----------------------------------------------------------------------------- the actor on CPU
def _actor(**kw):
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import TrainConfig

    model = kw.pop("model", ModelConfig(preset="tiny"))
    return MegatronActor(model, ParallelConfig(), TrainConfig(rollout_batch_size=4, mini_batch_size=4,
                                                              micro_batch_size=2), LossConfig(name="vespo"), **kw)


def test_actor_checks_fp8_before_building_anything(parallel_teardown_module, monkeypatch):
    import megatron_vespo.train.actor as actor_mod

    def no_build(*a, **k):
        raise AssertionError("the model must not be built when the FP8 checks fail")

    monkeypatch.setattr(actor_mod, "build_gpt_model", no_build)
    with pytest.raises(ConfigError, match=r"fp8\.fp8=e4m3 needs a CUDA GPU"):
        _actor(fp8=FP8Config(fp8="e4m3", fp8_recipe="blockwise"))
    # config errors come first, machine errors second
    with pytest.raises(ConfigError, match=r"model\.params_dtype=bfloat16"):
        _actor(fp8=FP8Config(fp8="e4m3", fp8_recipe="blockwise", fp8_param_gather=True))


def test_actor_without_fp8_reports_it(parallel_teardown_module):
    a = _actor(fp8=FP8Config())
    assert a.fp8_info == {"fp8/enabled": 0.0, "fp8/format": None, "fp8/fp8_param_tensors": 0.0}
    assert a.seq_multiple == 1
