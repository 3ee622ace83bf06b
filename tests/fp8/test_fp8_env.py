"""Machine checks for FP8 (``fp8/env.py``), with the environment injected: every GPU generation on CPU."""

import pytest

from megatron_vespo.config.base import ConfigError
from megatron_vespo.fp8 import RECIPES, REQUIREMENTS, FP8Config, FP8Environment, check_fp8_environment, fp8_advisories

NEW_TE, NEW_CUDA = "2.9.0", "12.9"


def env(cap=(9, 0), te=NEW_TE, cuda=NEW_CUDA, fp32_scales=False, name="") -> FP8Environment:
    return FP8Environment(cuda_available=True, capability=cap, cuda_version=cuda, te_version=te,
                          block_scaling_fp32_scales=fp32_scales, device_name=name)


def cfg(recipe="blockwise", fmt="e4m3", **kw) -> FP8Config:
    return FP8Config(fp8=fmt, fp8_recipe=recipe, **kw)


def test_fp8_off_checks_nothing():
    assert check_fp8_environment(FP8Config(), FP8Environment(cuda_available=False)) is None


def test_this_cpu_machine_is_refused_with_the_field_and_a_way_out():
    real = FP8Environment.detect()
    assert not real.cuda_available and real.te_version is None and real.te_error  # CPU-only, no TE here
    with pytest.raises(ConfigError, match=r"fp8\.fp8=hybrid needs a CUDA GPU.*fp8\.fp8: null"):
        check_fp8_environment(cfg("delayed", "hybrid"))  # default: the real machine


def test_missing_transformer_engine_names_the_extra():
    e = FP8Environment(cuda_available=True, capability=(9, 0), cuda_version=NEW_CUDA, te_version=None,
                       te_error="ModuleNotFoundError: No module named 'transformer_engine'")
    with pytest.raises(ConfigError, match=r"fp8\.fp8=e4m3 needs Transformer Engine.*No module named.*"
                                          r"megatron_vespo\[fp8\]"):
        check_fp8_environment(cfg(), e)


def test_mxfp8_on_hopper_message():
    with pytest.raises(ConfigError) as exc:
        check_fp8_environment(cfg("mxfp8"), env((9, 0), name="NVIDIA H100 80GB HBM3"))
    assert str(exc.value) == ("fp8.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0); "
                              "found 9.0 (NVIDIA H100 80GB HBM3)")


# Which (recipe, compute capability) pairs Transformer Engine runs, written out from TE's own
# check_fp8_support / check_fp8_block_scaling_support / check_mxfp8_support (v2.9+, CUDA 12.9).
SUPPORTED = {
    "delayed": {(8, 9), (9, 0), (10, 0), (10, 3), (12, 0)},
    "tensorwise": {(8, 9), (9, 0), (10, 0), (10, 3), (12, 0)},
    "blockwise": {(9, 0), (10, 0), (10, 3), (12, 0)},
    "mxfp8": {(10, 0), (10, 3)},
}
CAPS = [(7, 0), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("cap", CAPS)
def test_capability_matrix(recipe, cap):
    if cap in SUPPORTED[recipe]:
        assert check_fp8_environment(cfg(recipe), env(cap)) is not None
    else:
        with pytest.raises(ConfigError, match=rf"fp8\.fp8_recipe={recipe} .*compute capability"):
            check_fp8_environment(cfg(recipe), env(cap))


@pytest.mark.parametrize("recipe,cap,too_old,ok", [
    ("delayed", (9, 0), "1.10.0", "1.11.0"),
    ("tensorwise", (9, 0), "2.1.0", "2.2.0.dev0"),
    ("blockwise", (9, 0), "2.2.0", "2.3.0.dev0+5fdd7bb"),
    ("blockwise", (10, 0), "2.8.0", "2.9.0"),   # Blackwell emulation arrived in TE 2.9
    ("mxfp8", (10, 0), "2.0.0", "2.1.0"),
])
def test_transformer_engine_minimum_per_recipe(recipe, cap, too_old, ok):
    with pytest.raises(ConfigError, match=rf"fp8\.fp8_recipe={recipe} on compute capability .* needs "
                                          rf"transformer-engine >= .*found {too_old}"):
        check_fp8_environment(cfg(recipe), env(cap, te=too_old))
    check_fp8_environment(cfg(recipe), env(cap, te=ok))


def test_mxfp8_param_gather_needs_te_2_2():
    c = cfg("mxfp8", fp8_param_gather=True)
    with pytest.raises(ConfigError, match=r"fp8\.fp8_param_gather=true .* >= 2\.2\.0; found 2\.1\.0"):
        check_fp8_environment(c, env((10, 0), te="2.1.0"))
    check_fp8_environment(c, env((10, 0), te="2.2.0"))
    check_fp8_environment(cfg("mxfp8"), env((10, 0), te="2.1.0"))  # without FP8 params 2.1 is enough


def test_cuda_minimums():
    with pytest.raises(ConfigError, match=r"fp8\.fp8_recipe=blockwise .* CUDA >= 12\.9 .*found 12\.8"):
        check_fp8_environment(cfg("blockwise"), env((9, 0), cuda="12.8"))
    with pytest.raises(ConfigError, match=r"fp8\.fp8_recipe=delayed on compute capability 8\.9 needs CUDA >= 12\.1"):
        check_fp8_environment(cfg("delayed"), env((8, 9), cuda="12.0"))
    check_fp8_environment(cfg("delayed"), env((8, 9), cuda="12.1"))
    check_fp8_environment(cfg("delayed"), env((9, 0), cuda="11.8"))  # Hopper: no CUDA floor from TE


def test_blockwise_on_blackwell_needs_power_of_two_scales():
    with pytest.raises(ConfigError, match="NVTE_FP8_BLOCK_SCALING_FP32_SCALES"):
        check_fp8_environment(cfg("blockwise"), env((10, 0), fp32_scales=True))
    check_fp8_environment(cfg("blockwise"), env((9, 0), fp32_scales=True))  # Hopper: FP32 scales are fine


def test_requirement_table_covers_every_recipe():
    assert set(REQUIREMENTS) == set(RECIPES)


def test_advisories():
    notes = fp8_advisories(cfg("delayed"), env((9, 0)))
    assert any("amax" in n for n in notes)
    notes = fp8_advisories(cfg("blockwise"), env((9, 0)))
    assert any("NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1" in n for n in notes)
    assert not fp8_advisories(cfg("blockwise"), env((9, 0), fp32_scales=True))
    assert any("native" in n for n in fp8_advisories(cfg("blockwise"), env((10, 0))))
    assert not fp8_advisories(cfg("mxfp8"), env((10, 0)))
    assert fp8_advisories(FP8Config(), env()) == []


def test_environment_record_is_json_friendly():
    d = env((9, 0)).as_dict()
    assert d["capability"] == "9.0" and d["te_version"] == NEW_TE
