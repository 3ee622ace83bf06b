"""Conversion in one process: CLI round trip, dtype/sharding of the HF output, weight-export
buckets, and bad input (clear error, nothing written)."""

import json
import shutil

import pytest
import torch
from tiny_hf import make_tiny_hf

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

from megatron_vespo.cli import main  # noqa: E402


def _read_hf(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _nothing_written(out):
    assert not out.exists(), f"{out} was created"
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary directory left behind"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    hf = make_tiny_hf(root / "hf", mlp_only_layers=[0])
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(root / "mc"), "--verify"]) == 0
    return root, hf


def test_cli_round_trip_is_bit_exact_and_loads_in_transformers(tiny):
    root, hf = tiny
    out = root / "hf_back"
    assert main(["convert", "mcore-to-hf", "--ckpt", str(root / "mc"), "--out", str(out), "--verify",
                 "--max-shard-size", "300KB"]) == 0
    original, back = _read_hf(hf), _read_hf(out)
    # dense layer 0: 11 tensors; MoE layers 1-2: 9 + 8 experts x 3 each; embed, final norm, lm_head
    assert back.keys() == original.keys() and len(back) == 11 + 2 * (9 + 24) + 3
    assert all(torch.equal(back[k], original[k]) for k in original)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(original)
    # the limit applies to tensor bytes (as in transformers); the JSON header adds a few KB per file
    assert all(s.stat().st_size <= 300_000 + 20_000 for s in out.glob("*.safetensors"))
    assert (out / "tokenizer.json").read_text() == (hf / "tokenizer.json").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 8 and cfg["model_type"] == "qwen3_moe"  # explicit for transformers 4.x loaders
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    sd = model.state_dict()
    gate_up = sd["model.layers.2.mlp.experts.gate_up_proj"][5]
    assert torch.equal(gate_up, torch.cat([original["model.layers.2.mlp.experts.5.gate_proj.weight"],
                                           original["model.layers.2.mlp.experts.5.up_proj.weight"]]))


def test_bf16_export_and_weight_buckets(tiny):
    from megatron_vespo.checkpoint.convert import conversion_model, parallel_config
    from megatron_vespo.checkpoint.hf_dir import save_hf_checkpoint
    from megatron_vespo.checkpoint.hf_weights import iter_hf_weights
    from megatron_vespo.checkpoint.mapping import Qwen3MoeDims, expected_hf_names
    from megatron_vespo.checkpoint.model_ckpt import load_model_checkpoint

    root, hf = tiny
    cfg = json.loads((hf / "config.json").read_text())
    dims = Qwen3MoeDims.from_hf_config(cfg)
    with conversion_model(str(root / "mc" / "hf"), parallel_config(), torch.float32) as model:
        load_model_checkpoint(model, root / "mc")
        buckets = list(iter_hf_weights(model, cfg, bucket_bytes=100_000))  # HF config dict accepted
        names = [n for b in buckets for n, _ in b]
        assert len(buckets) > 3 and len(names) == len(set(names)) and set(names) == expected_hf_names(dims)
        assert all(sum(t.numel() * 4 for _, t in b) <= 100_000 for b in buckets)
        save_hf_checkpoint(model, cfg, root / "hf_bf16", source_dir=str(hf), dtype="bfloat16")
    original, back = _read_hf(hf), _read_hf(root / "hf_bf16")
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], original[k].bfloat16()) for k in original)
    assert json.loads((root / "hf_bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_bf16_checkpoint_round_trip_and_fp32_verification(tmp_path):
    """A bf16 base (like Qwen3-30B-A3B-Base): bf16 Megatron params, verified through an fp32 twin."""
    from megatron_vespo.checkpoint.convert import hf_to_mcore, mcore_to_hf

    hf = make_tiny_hf(tmp_path / "hf", dtype=torch.bfloat16, num_hidden_layers=2)
    report = hf_to_mcore(str(hf), str(tmp_path / "mc"), verify=True)
    assert report["params_dtype"] == "bfloat16" and report["max_abs_logit_diff"] < 1e-5
    report = mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"), verify=True)
    assert report["max_abs_logit_diff"] < 1e-5
    original, back = _read_hf(hf), _read_hf(tmp_path / "back")
    assert back.keys() == original.keys()
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], original[k]) for k in original)


def test_other_architecture_is_rejected(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64).save_pretrained(tmp_path)
    out = tmp_path / "out"
    from megatron_vespo.checkpoint.convert import hf_to_mcore

    with pytest.raises(ValueError, match=r"config\.json.*'llama'.*not supported"):
        hf_to_mcore(str(tmp_path), str(out))
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(tmp_path), "--out", str(out)]) == 2
    _nothing_written(out)


def test_missing_shard_is_named(tiny, tmp_path):
    from megatron_vespo.checkpoint.convert import hf_to_mcore

    _, hf = tiny
    broken = shutil.copytree(hf, tmp_path / "broken")
    (broken / "model-00003-of-00006.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model.safetensors.index.json lists shard 'model-00003-of-00006"):
        hf_to_mcore(str(broken), str(tmp_path / "out"))
    _nothing_written(tmp_path / "out")


def test_config_that_does_not_match_the_weights(tiny, tmp_path):
    from megatron_vespo.checkpoint.convert import hf_to_mcore

    _, hf = tiny
    bad = shutil.copytree(hf, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    msg = r"safetensors: tensor 'model.layers.1.mlp.experts.0.down_proj.weight' has shape \[64, 32\], config.json"
    with pytest.raises(ValueError, match=msg + r" implies \[64, 48\]"):
        hf_to_mcore(str(bad), str(tmp_path / "out"))
    _nothing_written(tmp_path / "out")


def test_layout_that_does_not_divide_the_model(tmp_path):
    from megatron_vespo.checkpoint.convert import hf_to_mcore

    hf = make_tiny_hf(tmp_path / "hf6", num_experts=6, num_hidden_layers=2)
    with pytest.raises(ValueError, match="expert_model_parallel_size=4 does not divide the model's num_experts=6"):
        hf_to_mcore(str(hf), str(tmp_path / "out"), ep=4)
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "out"), "--ep", "4",
                 "--nproc", "1"]) == 2
    _nothing_written(tmp_path / "out")


def test_failed_verification_and_bad_targets_write_nothing(tiny, tmp_path):
    from megatron_vespo.checkpoint.convert import hf_to_mcore, mcore_to_hf

    root, hf = tiny
    with pytest.raises(ValueError, match="verification failed"):  # tolerance 0: always fails after writing
        mcore_to_hf(str(root / "mc"), str(tmp_path / "out"), verify=True, tolerance=0.0)
    _nothing_written(tmp_path / "out")
    with pytest.raises(ValueError, match=r"\(the export rounds float32 weights to bfloat16: .* raise --tolerance"):
        mcore_to_hf(str(root / "mc"), str(tmp_path / "out"), verify=True, dtype="bfloat16")  # default tolerance
    _nothing_written(tmp_path / "out")
    with pytest.raises(ValueError, match="megatron_vespo_checkpoint.json"):
        mcore_to_hf(str(hf), str(tmp_path / "out2"))
    _nothing_written(tmp_path / "out2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        hf_to_mcore(str(hf), str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "x").read_text() == "keep me"


@pytest.mark.distributed
def test_cli_launches_two_ranks_ep2_and_loads_in_one_process(tiny, tmp_path):
    """``--ep 2`` makes the CLI spawn 2 ranks; the EP2 checkpoint exports bit-exactly from 1 process."""
    root, hf = tiny
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--ep", "2"]) == 0
    meta = json.loads((tmp_path / "mc" / "megatron_vespo_checkpoint.json").read_text())
    assert meta["saved_layout"]["ep"] == 2
    assert main(["convert", "mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "hf")]) == 0
    original, back = _read_hf(hf), _read_hf(tmp_path / "hf")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
