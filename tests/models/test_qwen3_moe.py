"""Qwen3-MoE HF config -> Megatron TransformerConfig / GPTModel: mapping, layouts, HF parity."""

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from megatron_vespo.config.base import ConfigError  # noqa: E402
from megatron_vespo.models.config import ModelConfig  # noqa: E402
from megatron_vespo.models.qwen3_moe import (  # noqa: E402
    get_hf_config,
    hf_config_to_transformer_config,
    moe_layer_pattern,
    rope_theta,
    validate_layout,
)
from megatron_vespo.train.config import ParallelConfig  # noqa: E402


def test_qwen3_30b_a3b_maps_to_megatron_fields():
    hf = get_hf_config(ModelConfig(preset="qwen3-30b-a3b"))
    tc = hf_config_to_transformer_config(hf, ParallelConfig(expert_model_parallel_size=8))
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == \
        (48, 2048, 32, 4, 128)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (128, 8, 768)
    assert tc.moe_layer_freq == [1] * 48
    assert tc.moe_router_pre_softmax is False  # norm_topk_prob=True: renormalised top-k
    assert tc.qk_layernorm and tc.gated_linear_unit and not tc.add_bias_linear and not tc.add_qkv_bias
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-6
    assert tc.expert_model_parallel_size == 8 and tc.moe_token_dispatcher_type == "alltoall"
    assert rope_theta(hf) == 1e6 and hf.vocab_size == 151936 and not hf.tie_word_embeddings


def test_dense_layers_rope_and_overrides():
    hf = get_hf_config(ModelConfig(preset="tiny-dense-first"))
    assert moe_layer_pattern(hf) == [0, 1]
    hf = get_hf_config(ModelConfig(preset="tiny", hf_overrides={"num_hidden_layers": 4, "decoder_sparse_step": 2,
                                                               "rope_theta": 5e5, "norm_topk_prob": False}))
    assert moe_layer_pattern(hf) == [0, 1, 0, 1] and rope_theta(hf) == 5e5
    tc = hf_config_to_transformer_config(hf, ParallelConfig())
    assert tc.moe_router_pre_softmax is True and tc.moe_layer_freq == [0, 1, 0, 1]
    with pytest.raises(ConfigError, match="model.hf_overrides.not_a_field"):
        get_hf_config(ModelConfig(preset="tiny", hf_overrides={"not_a_field": 1}))
    with pytest.raises(ConfigError, match="model.preset 'nope'"):
        get_hf_config(ModelConfig(preset="nope"))


def test_hf_path_reads_config_json(tmp_path):
    from transformers import Qwen3MoeConfig

    Qwen3MoeConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, intermediate_size=16,
                   vocab_size=64, rope_parameters={"rope_type": "default", "rope_theta": 123.0}
                   ).save_pretrained(tmp_path)
    hf = get_hf_config(ModelConfig(preset=None, hf_path=str(tmp_path)))
    assert hf.num_hidden_layers == 3 and rope_theta(hf) == 123.0


@pytest.mark.parametrize("layout, field", [
    (dict(expert_model_parallel_size=3), "expert_model_parallel_size=3 does not divide the model's num_experts=8"),
    (dict(tensor_model_parallel_size=4, sequence_parallel=True), "num_key_value_heads=2"),
    (dict(tensor_model_parallel_size=3, sequence_parallel=True), "num_attention_heads=4"),
    (dict(pipeline_model_parallel_size=3), "pipeline_model_parallel_size=3 does not divide the model's "
                                           "num_hidden_layers=2"),
    (dict(tensor_model_parallel_size=2), "sequence_parallel must be true"),
])
def test_layouts_that_do_not_divide_the_model_name_the_field(layout, field):
    hf = get_hf_config(ModelConfig(preset="tiny"))
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        validate_layout(hf, ParallelConfig(**layout))


def test_world_size_must_fit_tp_times_ep():
    hf = get_hf_config(ModelConfig(preset="tiny"))
    with pytest.raises(ConfigError, match="expert_tensor_parallel_size=1"):
        validate_layout(hf, ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True,
                                           expert_model_parallel_size=2), world_size=2)


def _hf_to_megatron_state(hf_model, hf_cfg):
    """Independent 1-process HF -> Megatron weight mapping (the checkpoint converter is tested on its own)."""
    sd = {k: v for k, v in hf_model.state_dict().items()}
    nh, ng, hd, h = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.head_dim, hf_cfg.hidden_size
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "output_layer.weight": sd["lm_head.weight"], "decoder.final_layernorm.weight": sd["model.norm.weight"]}
    for i in range(hf_cfg.num_hidden_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(ng, nh // ng * hd, h)
        k = sd[p + "self_attn.k_proj.weight"].view(ng, hd, h)
        v = sd[p + "self_attn.v_proj.weight"].view(ng, hd, h)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, h)
        out[m + "self_attention.linear_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[m + "self_attention.q_layernorm.weight"] = sd[p + "self_attn.q_norm.weight"]
        out[m + "self_attention.k_layernorm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[m + "input_layernorm.weight"] = sd[p + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if p + "mlp.gate.weight" in sd:
            out[m + "mlp.router.weight"] = sd[p + "mlp.gate.weight"]
            for e in range(hf_cfg.num_experts):
                out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = sd[p + "mlp.experts.gate_up_proj"][e]
                out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = sd[p + "mlp.experts.down_proj"][e]
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            out[m + "mlp.linear_fc2.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense-first"])
def test_megatron_logits_match_hf_transformers(preset):
    """Same weights -> same logits as transformers' Qwen3MoeForCausalLM (1 process)."""
    from transformers import Qwen3MoeForCausalLM

    from megatron_vespo.models.qwen3_moe import build_gpt_model
    from megatron_vespo.parallel.state import parallel_session

    hf_cfg = get_hf_config(ModelConfig(preset=preset, hf_overrides={"norm_topk_prob": preset == "tiny"}))
    torch.manual_seed(0)
    hf_model = Qwen3MoeForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF inits routers to zero: randomise so routing is non-trivial
        for n, prm in hf_model.named_parameters():
            prm.normal_(1.0 if "norm" in n else 0.0, 0.1 if "norm" in n else 0.05)
    with parallel_session(ParallelConfig()):
        model = build_gpt_model(hf_cfg, ParallelConfig())
        missing = model.load_state_dict(_hf_to_megatron_state(hf_model, hf_cfg), strict=False)
        assert not [k for k in missing.missing_keys if "_extra_state" not in k] and not missing.unexpected_keys
        model.eval()
        tokens = torch.randint(0, hf_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(12).expand(2, 12)
        with torch.no_grad():
            ours = model(tokens, pos, None)
            ref = hf_model(input_ids=tokens).logits
        assert ours.shape == ref.shape == (2, 12, hf_cfg.vocab_size)
        err = (ours - ref).abs().max().item()
        assert err < 2e-5, f"max |logit diff| {err}"


@pytest.mark.parametrize("path", ["/no/such/ckpt", "./missing", "missing_dir", "a/b/c"])
def test_missing_local_hf_path_is_named(path):
    with pytest.raises(ConfigError, match=r"model.hf_path '.*': no such directory"):
        get_hf_config(ModelConfig(preset=None, hf_path=path))
