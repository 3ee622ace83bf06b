"""Pure pieces of the weight sync: SGLang tensor payloads, HF-name views of the served model, configs."""

import io
import pickle

import pytest
import torch

from megatron_vespo.weight_sync.group import master_address_for, with_last
from megatron_vespo.weight_sync.tensor import serialize
from megatron_vespo.wire import dtype_name, flattened_bucket, parse_dtype, reconstruct_flattened

# Globals sglang 0.5.23's SafeUnpickler admits that a CPU/CUDA flattened-bucket payload can use
# (sglang/srt/utils/common.py ALLOWED_GLOBALS, the relevant subset).
SGLANG_ALLOWED = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "int"), ("builtins", "str"),
    ("collections", "OrderedDict"), ("copyreg", "__newobj__"), ("types", "SimpleNamespace"),
    ("torch", "Tensor"), ("torch", "Size"), ("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"),
    ("torch", "uint8"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"), ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_storage_fd"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("multiprocessing.resource_sharer", "DupFd"),
    ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"),
    ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"),
}


class _Recorder(pickle.Unpickler):
    def __init__(self, data):
        super().__init__(io.BytesIO(data))
        self.seen = set()

    def find_class(self, module, name):
        self.seen.add((module, name))
        return super().find_class(module, name)


def _named():
    g = torch.Generator().manual_seed(0)
    return [("a.weight", torch.randn(3, 5, generator=g)),
            ("b.weight", torch.randn(7, generator=g).to(torch.bfloat16)),
            ("c.weight", torch.randn(2, 2, 2, generator=g).to(torch.float16)),
            ("d.weight", torch.randn(0, 4, generator=g))]


def test_flattened_bucket_is_what_sglang_reads():
    named = _named()
    data = flattened_bucket(named)
    flat, meta = data["flattened_tensor"], data["metadata"]
    assert flat.dtype == torch.uint8 and flat.numel() == sum(t.numel() * t.element_size() for _, t in named)
    by_name = dict(named)
    assert [m.name for m in meta] == ["a.weight", "d.weight", "b.weight", "c.weight"]  # fp32 first: aligned
    for m in meta:  # sglang 0.5.23 FlattenedTensorBucket.reconstruct_tensors
        assert m.numel == m.end_idx - m.start_idx and m.start_idx % m.dtype.itemsize == 0
        assert torch.equal(flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape), by_name[m.name])
    rebuilt = reconstruct_flattened(flat, [(m.name, m.dtype, list(m.shape), m.start_idx, m.end_idx) for m in meta])
    assert all(torch.equal(t, by_name[n]) for n, t in rebuilt)
    packed = reconstruct_flattened(flat, [(m.name, m.dtype, list(m.shape)) for m in meta])  # the broadcast path
    assert all(torch.equal(t, by_name[n]) for n, t in packed)


def test_serialized_payload_only_uses_globals_sglang_allows():
    import base64

    from megatron_vespo.rollout.embedded.weight_update import deserialize_named_tensors

    named = _named()
    payload = serialize(flattened_bucket(named))
    assert isinstance(payload, str)
    rec = _Recorder(base64.b64decode(payload))
    obj = rec.load()
    assert rec.seen <= SGLANG_ALLOWED, rec.seen - SGLANG_ALLOWED
    assert set(obj) == {"flattened_tensor", "metadata"}
    back = dict(deserialize_named_tensors(serialize(flattened_bucket(named)), "flattened_bucket"))
    assert back.keys() == dict(named).keys() and all(torch.equal(back[n], t) for n, t in named)
    plain = deserialize_named_tensors(serialize([(n, t) for n, t in named]), None)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(named, plain))


def test_payload_unpickler_blocks_code():
    import base64

    from megatron_vespo.rollout.embedded.weight_update import deserialize_named_tensors

    evil = base64.b64encode(pickle.dumps({"flattened_tensor": print, "metadata": []})).decode()
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        deserialize_named_tensors(evil, "flattened_bucket")


def test_reconstruct_rejects_inconsistent_metadata():
    flat = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not hold"):
        reconstruct_flattened(flat, [("x", torch.float32, [5])])
    with pytest.raises(ValueError, match="aligned"):
        reconstruct_flattened(flat, [("x", torch.float32, [2], 2, 10)])
    with pytest.raises(ValueError, match="1-D uint8"):
        reconstruct_flattened(torch.zeros(4), [])
    with pytest.raises(ValueError, match="no tensors"):
        flattened_bucket([])


def test_hf_param_views_match_the_checkpoint_transformers_writes(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from megatron_vespo.rollout.embedded.models import build_tiny_model
    from megatron_vespo.rollout.embedded.weight_update import hf_param_views, load_named_tensors

    model = build_tiny_model("tiny", seed=3)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    views = hf_param_views(model)
    assert any(".experts.5.up_proj.weight" in k for k in saved)  # per-expert names on disk, fused in memory
    assert set(saved) <= set(views)
    assert all(torch.equal(views[k], saved[k]) for k in saved)
    # loading the checkpoint's tensors through the views into another model reproduces it exactly
    other = build_tiny_model("tiny", seed=4)
    assert load_named_tensors(other, list(saved.items())) == len(saved)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(ValueError, match="duplicate"):
        load_named_tensors(other, [("model.norm.weight", saved["model.norm.weight"])] * 2)
    with pytest.raises(ValueError, match="floating point"):
        load_named_tensors(other, [("model.norm.weight", torch.zeros(64, dtype=torch.int32))])


def test_small_helpers():
    assert [x for x in with_last([])] == []
    assert list(with_last("abc")) == [("a", False), ("b", False), ("c", True)]
    assert dtype_name(torch.bfloat16) == "bfloat16" and parse_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float33")
    assert master_address_for(["http://127.0.0.1:1", "http://localhost:2"]) == "127.0.0.1"


def test_config_and_factory():
    from megatron_vespo.config.base import load_config
    from megatron_vespo.config.job import JobConfig
    from megatron_vespo.weight_sync import WeightSyncConfig, build_weight_sync
    from megatron_vespo.weight_sync.factory import DistributedEngineSync, EngineWeightSync

    assert WeightSyncConfig(bucket_mb=0.5).bucket_bytes == 2**19
    job = load_config(JobConfig, "examples/configs/tiny_cpu_vespo.yaml",
                      ["weight_sync.kind=distributed", "weight_sync.bucket_mb=64", "weight_sync.backend=gloo"])
    assert job.weight_sync.bucket_bytes == 64 * 2**20
    with pytest.raises(ValueError, match="weight_sync.backend"):
        load_config(JobConfig, "examples/configs/tiny_cpu_vespo.yaml", ["weight_sync.backend=mpi"])
    hf = {"model_type": "qwen3_moe", "num_attention_heads": 4, "hidden_size": 64, "num_hidden_layers": 1,
          "num_experts": 2, "vocab_size": 16, "moe_intermediate_size": 8, "intermediate_size": 8}
    assert type(build_weight_sync("disk", root="/tmp/x", hf_cfg=hf)) is EngineWeightSync
    assert isinstance(build_weight_sync("distributed", root="/tmp/x", hf_cfg=hf), DistributedEngineSync)
    with pytest.raises(ValueError, match="weight_sync.kind must be one of"):
        build_weight_sync("nfs", root="/tmp/x", hf_cfg=hf)
