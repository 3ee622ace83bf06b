"""Pure-torch tests of the HF <-> Megatron Qwen3-MoE name/layout mapping (no Megatron needed)."""

import pytest
import torch

from megatron_vespo.checkpoint.mapping import (
    Qwen3MoeDims,
    build_rules,
    canonical_name,
    expected_hf_names,
    hf_shape,
    hf_to_mcore,
    mcore_to_hf,
    tp_shard,
    tp_unshard,
)

CFG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=250, hidden_size=64,
           num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_experts=6,
           moe_intermediate_size=32, intermediate_size=96, mlp_only_layers=[0], tie_word_embeddings=False)


def _dims(**kw):
    return Qwen3MoeDims.from_hf_config({**CFG, **kw})


def _random_hf(dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(hf_shape(n, dims), generator=g) for n in sorted(expected_hf_names(dims))}


def test_dims_and_rule_set():
    dims = _dims()
    assert dims.moe_layers == frozenset({1, 2})
    rules = build_rules(dims)
    names = [r.mcore for r in rules]
    assert len(names) == len(set(names))
    # every HF tensor belongs to exactly one rule
    hf = [n for r in rules for n in r.hf]
    assert len(hf) == len(set(hf)) == len(expected_hf_names(dims))
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names
    assert "decoder.layers.2.mlp.experts.local_experts.5.linear_fc2.weight" in names
    assert "output_layer.weight" in names
    tied = build_rules(_dims(tie_word_embeddings=True))
    assert "output_layer.weight" not in [r.mcore for r in tied]


def test_decoder_sparse_step():
    dims = _dims(mlp_only_layers=[], decoder_sparse_step=2, num_hidden_layers=4)
    assert dims.moe_layers == frozenset({1, 3})


def test_other_architecture_rejected():
    with pytest.raises(ValueError, match=r"llama.*not supported"):
        Qwen3MoeDims.from_hf_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "x/config.json")
    with pytest.raises(ValueError, match="missing field 'moe_intermediate_size'"):
        Qwen3MoeDims.from_hf_config({k: v for k, v in CFG.items() if k != "moe_intermediate_size"})


def test_full_round_trip_bit_exact():
    dims = _dims()
    hf = _random_hf(dims)
    back = {}
    for rule in build_rules(dims):
        full = hf_to_mcore(rule, [hf[n] for n in rule.hf], dims)
        back.update(mcore_to_hf(rule, full, dims))
    assert back.keys() == hf.keys()
    for n in hf:
        assert torch.equal(back[n], hf[n]), n


def test_qkv_layout_matches_megatron_split():
    """Emulate megatron's SelfAttention.get_query_key_value_tensors on the fused weight."""
    dims = _dims()
    hf = _random_hf(dims)
    rule = next(r for r in build_rules(dims) if r.mcore.endswith("0.self_attention.linear_qkv.weight"))
    qkv = hf_to_mcore(rule, [hf[n] for n in rule.hf], dims)
    x = torch.randn(5, dims.hidden_size)
    g, hd = dims.num_key_value_heads, dims.head_dim
    r = dims.num_attention_heads // g
    mixed = (x @ qkv.T).view(5, g, (r + 2) * hd)
    q, k, v = torch.split(mixed, [r * hd, hd, hd], dim=2)
    q = q.reshape(5, -1, hd)
    p = "model.layers.0.self_attn."
    assert torch.allclose(q, (x @ hf[p + "q_proj.weight"].T).view(5, -1, hd), atol=1e-6)
    assert torch.allclose(k, (x @ hf[p + "k_proj.weight"].T).view(5, g, hd), atol=1e-6)
    assert torch.allclose(v, (x @ hf[p + "v_proj.weight"].T).view(5, g, hd), atol=1e-6)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shard_unshard(tp):
    dims = _dims()
    hf = _random_hf(dims)
    padded = 256  # vocab 250 padded like make_vocab_size_divisible_by
    for rule in build_rules(dims):
        full = hf_to_mcore(rule, [hf[n] for n in rule.hf], dims)
        shards = [tp_shard(rule, full, r, tp, padded_vocab=padded) for r in range(tp)]
        if rule.vocab:
            assert sum(s.shape[0] for s in shards) == padded
            assert torch.count_nonzero(shards[-1][-(padded - 250):]) == 0
        assert torch.equal(tp_unshard(rule, shards, vocab_size=dims.vocab_size), full), rule.mcore


def test_gate_up_shard_is_gate_then_up_per_rank():
    dims = _dims()
    rule = next(r for r in build_rules(dims) if r.kind == "gate_up" and r.expert == 3)
    gate = torch.arange(32 * 4, dtype=torch.float32).view(32, 4)
    up = -gate
    full = hf_to_mcore(rule, [gate, up], dims)
    s1 = tp_shard(rule, full, 1, 2)
    assert torch.equal(s1, torch.cat([gate[16:], up[16:]]))


def test_tp_indivisible_is_an_error():
    dims = _dims()
    rule = next(r for r in build_rules(dims) if r.mcore.endswith("linear_proj.weight"))
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 3"):
        tp_shard(rule, torch.zeros(64, 128), 0, 3)


def test_canonical_names():
    assert canonical_name("module.module.decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight",
                          layer_offset=2, expert_offset=4) == \
        "decoder.layers.3.mlp.experts.local_experts.6.linear_fc1.weight"
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.0.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert canonical_name("decoder.layers.4.mlp.experts.linear_fc2.weight3", expert_offset=8) == \
        "decoder.layers.4.mlp.experts.local_experts.11.linear_fc2.weight"
    with pytest.raises(ValueError, match="not supported"):
        canonical_name("decoder.layers.0.mlp.experts.weight1")
