"""FP8Config rules and the cross-section checks (no GPU needed): errors name the key to change."""

from pathlib import Path

import pytest

from megatron_vespo.config import ConfigError, load_config
from megatron_vespo.config.job import JobConfig
from megatron_vespo.fp8 import FP8Config, check_fp8_job, check_fp8_model_dims, fp8_alignment
from megatron_vespo.models.config import ModelConfig
from megatron_vespo.train.config import ParallelConfig

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_off_and_megatron_compatible():
    c = FP8Config()
    assert not c.enabled and c.fp8_recipe == "delayed"
    assert (c.fp8_amax_history_len, c.fp8_amax_compute_algo, c.fp8_margin) == (1024, "max", 0)


@pytest.mark.parametrize("override,match", [
    ("fp8.fp8=e5m2", r"fp8\.fp8:.*'e4m3'.*'hybrid'"),
    ("fp8.fp8_recipe=custom", r"fp8\.fp8_recipe:.*'mxfp8'"),
    ("fp8.fp8_amax_history_len=0", r"fp8\.fp8_amax_history_len"),
    ("fp8.fp8_param=true", r"fp8\.fp8_param: unknown key"),  # the FP8Config name is fp8_param_gather
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(JobConfig, None, [override])


def test_megatron_rules_at_load_time():
    with pytest.raises(ConfigError, match=r"fp8\.first_last_layers_bf16=true does not work with "
                                          r"fp8\.fp8_recipe=delayed"):
        load_config(JobConfig, None, ["fp8.fp8=e4m3", "fp8.first_last_layers_bf16=true"])
    load_config(JobConfig, None, ["fp8.fp8=e4m3", "fp8.fp8_recipe=blockwise", "fp8.first_last_layers_bf16=true"])
    # with FP8 off, the layer flag is inert (Megatron ignores it too)
    load_config(JobConfig, None, ["fp8.first_last_layers_bf16=true"])
    with pytest.raises(ConfigError, match=r"fp8\.fp8_param_gather=true needs fp8\.fp8 set"):
        load_config(JobConfig, None, ["fp8.fp8_param_gather=true"])
    with pytest.raises(ConfigError, match=r"reuse_grad_buf_for_mxfp8_param_ag=true needs fp8\.fp8_recipe=mxfp8 and "
                                          r"fp8\.fp8_param_gather=true"):
        load_config(JobConfig, None, ["fp8.fp8=e4m3", "fp8.fp8_recipe=mxfp8",
                                      "fp8.reuse_grad_buf_for_mxfp8_param_ag=true"])
    c = load_config(JobConfig, None, ["fp8.fp8=e4m3", "fp8.fp8_recipe=mxfp8", "fp8.fp8_param_gather=true",
                                      "fp8.reuse_grad_buf_for_mxfp8_param_ag=true", "model.params_dtype=bfloat16"])
    assert c.fp8.reuse_grad_buf_for_mxfp8_param_ag


def test_cross_section_rules_in_job_config():
    base = ["fp8.fp8=e4m3", "fp8.fp8_recipe=blockwise", "fp8.fp8_param_gather=true"]
    with pytest.raises(ConfigError, match=r"needs model\.params_dtype=bfloat16 \(got float32\)"):
        load_config(JobConfig, None, base)
    with pytest.raises(ConfigError, match=r"needs parallel\.use_distributed_optimizer=true"):
        load_config(JobConfig, None, base + ["model.params_dtype=bfloat16", "parallel.use_distributed_optimizer=false"])
    load_config(JobConfig, None, base + ["model.params_dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"model\.transformer_overrides\.fp8_recipe: FP8 is configured in the fp8 "
                                          r"section \(fp8\.fp8_recipe\)"):
        load_config(JobConfig, None, ["fp8.fp8=e4m3", "model.transformer_overrides={fp8_recipe: mxfp8}"])
    with pytest.raises(ConfigError, match=r"\(fp8\.fp8_param_gather\)"):
        load_config(JobConfig, None, ["fp8.fp8=e4m3", "model.transformer_overrides={fp8_param: true}"])
    # FP8 fields that FP8Config does not own still pass through (Megatron validates them)
    load_config(JobConfig, None, ["fp8.fp8=e4m3", "model.transformer_overrides={fp8_dot_product_attention: false}"])


class _HF:
    """The few Qwen3-MoE config fields the FP8 checks read (30B-A3B values by default)."""

    def __init__(self, **kw):
        self.num_hidden_layers, self.hidden_size, self.intermediate_size = 48, 2048, 6144
        self.num_attention_heads, self.num_key_value_heads, self.head_dim = 32, 4, 128
        self.num_experts, self.moe_intermediate_size = 128, 768
        self.__dict__.update(kw)


def test_bf16_layer_counts_against_pipeline_stages():
    c = FP8Config(fp8="e4m3", fp8_recipe="blockwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=13)
    check_fp8_job(c, None, ParallelConfig(pipeline_model_parallel_size=2), _HF())  # 24 per stage
    with pytest.raises(ConfigError, match=r"fp8\.num_layers_at_start_in_bf16=13 exceeds the layers per pipeline "
                                          r"stage \(48 layers / pipeline_model_parallel_size 4 = 12\)"):
        check_fp8_job(c, None, ParallelConfig(pipeline_model_parallel_size=4), _HF())


def test_gemm_dims_must_be_fp8_aligned():
    aligns = [fp8_alignment(FP8Config(fp8="e4m3", fp8_recipe=r)) for r in ("delayed", "blockwise", "mxfp8")]
    assert aligns == [16, 16, 32]
    assert fp8_alignment(FP8Config()) == 1 and fp8_alignment(None) == 1
    check_fp8_model_dims(FP8Config(fp8="e4m3", fp8_recipe="mxfp8"), _HF(),
                         ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True,
                                        expert_tensor_parallel_size=1))
    with pytest.raises(ConfigError, match=r"multiple of 16; the model's hidden_size = 72"):
        check_fp8_model_dims(FP8Config(fp8="e4m3"), _HF(hidden_size=72))
    # 768 / ETP 16 = 48: fine for 16, not for MXFP8's 32
    par = ParallelConfig(expert_tensor_parallel_size=16)
    check_fp8_model_dims(FP8Config(fp8="e4m3", fp8_recipe="blockwise"), _HF(), par)
    with pytest.raises(ConfigError, match=r"mxfp8 .* multiple of 32; the model's moe_intermediate_size / "
                                          r"expert_tensor_parallel_size = 48"):
        check_fp8_model_dims(FP8Config(fp8="e4m3", fp8_recipe="mxfp8"), _HF(), par)


def test_fp8_examples_validate_and_use_a_scaling_recipe():
    fp8_examples = []
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        job = load_config(JobConfig, path)
        if job.fp8.enabled:
            fp8_examples.append(path.name)
            assert job.fp8.fp8_recipe in ("blockwise", "mxfp8", "tensorwise"), path
            assert job.model.params_dtype == "bfloat16", path
            assert job.loss.rollout_is.enabled or job.train.old_log_prob_source == "rollout", path
    assert "qwen3_30b_a3b_fp8_grpo_baseline.yaml" in fp8_examples
    assert "qwen3_30b_a3b_fp8_vespo.yaml" in fp8_examples


def test_model_config_default_is_untouched():
    # a plain job (FP8 off) passes every FP8 check
    check_fp8_job(JobConfig().fp8, ModelConfig(), ParallelConfig(), _HF())
