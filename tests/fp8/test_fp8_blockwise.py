"""Block-wise FP8 export for an FP8 rollout engine: quantiser, SGLang layout, TP/EP block rules,
``convert mcore-to-hf --fp8-blockwise`` end to end, and the embedded engine loading the result."""

import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_vespo.config.base import ConfigError
from megatron_vespo.fp8.blockwise import (
    BlockFP8Format,
    block_layout_problems,
    check_block_layout,
    dequantize_blockwise,
    dequantize_named_tensors,
    is_quantized_linear,
    quantization_config,
    quantize_blockwise,
    quantize_named_tensors,
)
from megatron_vespo.models.presets import preset_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))


def _fp8_bound(w: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    """E4M3 round-to-nearest error: half a step, 2^-4 relative for normals, 2^-10 x scale in the subnormal range."""
    return torch.maximum(w.abs() * 2.0**-4, scale_full * 2.0**-10) * (1 + 1e-6)


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((64, 96), (32, 32))])
def test_round_trip_within_fp8_rounding(shape, block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[1])  # columns spanning 4 decades
    w[: block[0], : block[1]] = 0.0  # an all-zero block
    q, s = quantize_blockwise(w, block)
    gn, gk = -(-shape[0] // block[0]), -(-shape[1] // block[1])
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (gn, gk)  # SGLang: ceil(N / block_n) x ceil(K / block_k)
    back = dequantize_blockwise(q, s, block)
    full = s.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]
    assert torch.all((back - w).abs() <= _fp8_bound(w, full))
    assert torch.equal(back[: block[0], : block[1]], w[: block[0], : block[1]])  # zeros stay zero, scale 1
    # the block amax maps to E4M3's largest value: the scale is amax / 448, not a power of two
    tile = w[-block[0]:, -block[1]:] if shape[0] % block[0] == 0 and shape[1] % block[1] == 0 else None
    if tile is not None:
        assert s[-1, -1] == pytest.approx(float(tile.abs().max()) / 448.0, rel=1e-6)
    # idempotent: quantising the dequantised weights gives the same bytes
    q2, s2 = quantize_blockwise(back, block)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.allclose(s2, s)


def test_no_nan_on_outliers_and_bad_shapes_are_refused():
    w = torch.tensor([[1e30, -3.0], [2.0, 1e-30]])
    q, s = quantize_blockwise(w, (128, 128))
    assert not torch.isnan(q.float()).any()
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise(torch.ones(4))
    with pytest.raises(ValueError, match="does not match"):
        dequantize_blockwise(q, torch.ones(2, 2), (128, 128))


def test_named_bucket_keeps_router_norms_embeddings_high_precision():
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
             "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_norm.weight",
             "model.layers.0.mlp.gate.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
             "model.layers.1.mlp.gate_proj.weight"]
    quantised = {n for n in names if is_quantized_linear(n)}
    assert quantised == set(names[6:])
    named = [(n, torch.randn(64, 64) if "norm" not in n else torch.randn(64)) for n in names]
    out = quantize_named_tensors(named, (32, 32))
    got = dict(out)
    for n, t in named:
        if n in quantised:
            assert got[n].dtype == torch.float8_e4m3fn and got[n + "_scale_inv"].shape == (2, 2)
            # each scale directly follows its weight (a bucket boundary never separates them)
            i = [x for x, _ in out].index(n)
            assert out[i + 1][0] == n + "_scale_inv"
        else:
            assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], t.to(torch.bfloat16))
    back = dict(dequantize_named_tensors(out))
    assert set(back) == set(names)
    with pytest.raises(ValueError, match="without its"):
        dequantize_named_tensors([x for x in out if not x[0].endswith("q_proj.weight_scale_inv")])
    assert quantization_config() == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}


def _qwen30b():
    return {**preset_kwargs("qwen3-30b-a3b"), "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}


def test_engine_layout_rules_per_tp_size():
    cfg = _qwen30b()
    assert block_layout_problems(cfg, (128, 128), tp_size=1) == []
    assert block_layout_problems(cfg, (128, 128), tp_size=2) == []  # 768 / 2 = 384
    with pytest.raises(ConfigError, match=r"moe_intermediate_size / moe_tp = 768 / 4 .* = 192 is not a multiple of "
                                          r"128") as exc:
        check_block_layout(cfg, (128, 128), tp_size=4)
    assert "weight_sync.dtype=fp8" in str(exc.value) and "--ep-size 4" in str(exc.value)
    assert block_layout_problems(cfg, (128, 128), tp_size=4, ep_size=4) == []  # experts whole per rank
    assert block_layout_problems(cfg, (128, 128), tp_size=8, ep_size=8) == []  # KV heads replicated: 1 x 128
    # the tiny test model: q/k partitions of the merged qkv are 64 / 32 rows, refused even at TP 1
    tiny = {**preset_kwargs("tiny"), "model_type": "qwen3_moe"}
    assert any("num_attention_heads * head_dim" in p for p in block_layout_problems(tiny, (128, 128)))
    assert block_layout_problems(tiny, (32, 32)) == []
    assert any("down_proj input" in p for p in block_layout_problems(tiny, (32, 32), tp_size=2))


def test_weight_sync_refuses_a_layout_the_engine_rejects(tmp_path):
    from megatron_vespo.weight_sync import WeightSyncConfig, build_weight_sync

    cfg = WeightSyncConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="weight_sync.dtype=fp8 .*moe_intermediate_size"):
        build_weight_sync("disk", root=tmp_path, hf_cfg=_qwen30b(), cfg=cfg, engine_tp_size=4)
    build_weight_sync("disk", root=tmp_path, hf_cfg=_qwen30b(), cfg=cfg, engine_tp_size=4, engine_ep_size=4)
    assert isinstance(cfg.export_dtype, BlockFP8Format) and cfg.export_dtype.block == (128, 128)
    assert WeightSyncConfig(dtype="bfloat16").export_dtype == "bfloat16"
    with pytest.raises(ValueError, match="weight_sync.fp8_block_size must be two positive ints"):
        WeightSyncConfig(dtype="fp8", fp8_block_size=[0, 128])


# ----------------------------------------------------------------------------- end to end (Megatron -> HF FP8)
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformers")
    from tiny_hf import make_tiny_hf

    from megatron_vespo.cli import main

    root = tmp_path_factory.mktemp("fp8exp")
    hf = make_tiny_hf(root / "hf", mlp_only_layers=[0])
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(root / "mc")]) == 0
    assert main(["convert", "mcore-to-hf", "--ckpt", str(root / "mc"), "--out", str(root / "fp8"), "--fp8-blockwise",
                 "--fp8-block-size", "32", "32", "--max-shard-size", "100KB"]) == 0
    return root, hf


def _read(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_convert_fp8_blockwise_layout_and_round_trip(exported):
    root, hf = exported
    out = root / "fp8"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [32, 32]}
    assert cfg["dtype"] == "bfloat16"
    orig, got = _read(hf), _read(out)
    scales = {n for n in got if n.endswith("_scale_inv")}
    assert set(got) - scales == set(orig)
    assert scales == {n + "_scale_inv" for n in orig if is_quantized_linear(n)}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, and every scale sits in its weight's shard
    assert all(index["weight_map"][s] == index["weight_map"][s[: -len("_scale_inv")]] for s in scales)
    for n, w in orig.items():
        if is_quantized_linear(n):
            q, s = got[n], got[n + "_scale_inv"]
            assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            assert s.shape == (-(-w.shape[0] // 32), -(-w.shape[1] // 32))
            full = s.repeat_interleave(32, 0).repeat_interleave(32, 1)
            assert torch.all((dequantize_blockwise(q, s) - w).abs() <= _fp8_bound(w, full)), n
        else:  # norms, router (mlp.gate), embeddings, lm_head: bf16 of the original
            assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], w.to(torch.bfloat16)), n


def test_convert_refuses_blocks_the_engine_cannot_load(exported, tmp_path):
    from megatron_vespo.checkpoint.convert import mcore_to_hf

    root, _ = exported
    with pytest.raises(ConfigError, match=r"--fp8-blockwise .*num_attention_heads \* head_dim"):
        mcore_to_hf(str(root / "mc"), str(tmp_path / "x"), fp8_block=[128, 128])
    with pytest.raises(ConfigError, match="down_proj input"):
        mcore_to_hf(str(root / "mc"), str(tmp_path / "x"), fp8_block=[32, 32], engine_tp_size=2)
    assert not (tmp_path / "x").exists()


def test_embedded_engine_serves_the_fp8_export(exported):
    from megatron_vespo.fp8.serving import served_fp8_block
    from megatron_vespo.rollout.embedded.models import load_hf_model, reload_weights_in_place
    from megatron_vespo.rollout.embedded.weight_update import load_named_tensors

    root, hf = exported
    ref = load_hf_model(hf)
    model = load_hf_model(root / "fp8")
    assert served_fp8_block(model) == (32, 32) and served_fp8_block(ref) is None
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(tokens).logits, model(tokens).logits
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.1  # FP8 weights: close, not identical
    # SGLang keeps its start-up format: FP8 into a BF16 engine and BF16 into an FP8 engine are refused
    fp8 = _read(root / "fp8")
    bucket = [(n, fp8[n]) for n in ("model.layers.1.self_attn.q_proj.weight",
                                    "model.layers.1.self_attn.q_proj.weight_scale_inv")]
    with pytest.raises(ValueError, match="non-FP8"):
        load_named_tensors(ref, bucket)
    with pytest.raises(ValueError, match="serves block FP8"):
        load_named_tensors(model, [("model.layers.1.self_attn.q_proj.weight", torch.zeros(64, 64))])
    with pytest.raises(ValueError, match="needs float32"):
        load_named_tensors(model, [bucket[0], (bucket[1][0], bucket[1][1][:1])])
    assert load_named_tensors(model, bucket) == 1
    with pytest.raises(ValueError, match="engine serves"):
        reload_weights_in_place(ref, root / "fp8")
    assert reload_weights_in_place(model, root / "fp8") > 0
