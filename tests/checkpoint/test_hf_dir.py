"""HF directory reading/writing without Megatron: index validation, sharded writer, side files."""

import json

import pytest
import torch

from megatron_vespo.checkpoint.hf_dir import HFCheckpointReader, ShardedSafetensorsWriter, copy_side_files


def test_writer_shards_by_size_and_reader_reads_back(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=1000)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    w.add_all(tensors.items())
    with pytest.raises(ValueError, match="written twice"):
        w.add("t0", tensors["t0"])
    shards = w.finalize()
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 and set(index["weight_map"]) == set(tensors)
    assert not list(tmp_path.glob(".shard-*"))
    r = HFCheckpointReader(tmp_path)
    assert r.keys() == sorted(tensors) and all(torch.equal(r.get(k), v) for k, v in tensors.items())
    with pytest.raises(KeyError, match="'nope' not found"):
        r.get("nope")


def test_writer_without_copies_keeps_views_and_copies_only_overlapping_tensors(tmp_path):
    """copy=False (save_hf_checkpoint): disjoint views of one storage (QKV / gate-up splits of a
    parameter) are written as they are; overlapping ones (tied weights) are cloned at the flush."""
    fused = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for d in ("views", "tied"):
        (tmp_path / d).mkdir()
    w = ShardedSafetensorsWriter(tmp_path / "views", copy=False)
    w.add_all([("q", fused[0]), ("k", fused[1]), ("v", fused[2])])
    assert w._pending["q"].data_ptr() == fused[0].data_ptr()  # no copy was made
    w.finalize()
    r = HFCheckpointReader(tmp_path / "views")
    assert all(torch.equal(r.get(n), fused[i]) for i, n in enumerate("qkv"))
    emb = torch.randn(5, 3)
    w = ShardedSafetensorsWriter(tmp_path / "tied", copy=False)
    w.add_all([("embed", emb), ("lm_head", emb)])  # the same memory twice: safetensors refuses it as is
    w.finalize()
    r = HFCheckpointReader(tmp_path / "tied")
    assert torch.equal(r.get("embed"), emb) and torch.equal(r.get("lm_head"), emb)
    w = ShardedSafetensorsWriter(tmp_path / "copied")  # the default copies every tensor
    w.add("q", fused[0])
    assert w._pending["q"].data_ptr() != fused[0].data_ptr()


def test_index_pointing_at_the_wrong_shard_is_named(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=500)
    w.add_all({"a": torch.zeros(100), "b": torch.ones(100)}.items())
    w.finalize()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["a"] = index["weight_map"]["b"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors: cannot read 'a'"):
        HFCheckpointReader(tmp_path).get("a")


def test_no_weights_and_side_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither model.safetensors.index.json nor model.safetensors"):
        HFCheckpointReader(tmp_path)
    for name in ("tokenizer.json", "generation_config.json", "chat_template.jinja", "pytorch_model.bin",
                 "model.safetensors.index.json"):
        (tmp_path / name).write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    assert copy_side_files(tmp_path, out) == ["chat_template.jinja", "config.json", "generation_config.json",
                                              "tokenizer.json"]
