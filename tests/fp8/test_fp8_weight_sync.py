"""``weight_sync.dtype=fp8`` end to end on CPU: a tiny Megatron actor exports a block-FP8 directory,
an embedded engine starts from it (as an FP8 SGLang engine must), and the distributed (per-tensor
and flattened-bucket broadcasts over gloo) and tensor (shared-memory payload) syncs send FP8
weights + ``weight_scale_inv``; the served weights are then exactly the dequantised FP8 export.
A BF16 update into the FP8 engine is refused by the engine (SGLang would cast it silently)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "weight_sync"))
from ws_helpers import build_model, engine_state, fill_nan, nan_params, new_loop  # noqa: E402

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")
pytestmark = pytest.mark.distributed

BLOCK = (32, 32)  # the tiny model's q / k partitions (64 / 32 rows) are not whole 128-blocks


def _cfg(**kw):
    from megatron_vespo.weight_sync.config import WeightSyncConfig

    return WeightSyncConfig(**{"bucket_mb": 0.05, "init_timeout_s": 30, "op_timeout_s": 60, "dtype": "fp8",
                               "fp8_block_size": BLOCK, **kw})


def _expected(model, hf_cfg):
    """What an FP8 engine serves: the export quantised per block and dequantised (bf16 for the rest)."""
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict
    from megatron_vespo.fp8.blockwise import dequantize_named_tensors, quantize_named_tensors

    ref = export_hf_state_dict(model, hf_cfg)
    named = dequantize_named_tensors(quantize_named_tensors(list(ref.items()), BLOCK), dtype=torch.float32)
    return {n: t.float() for n, t in named}


def _mismatch(engine, expected):
    state = engine_state(engine)
    return [k for k, t in expected.items() if not torch.equal(state[k], t)]


def _scenario(tmp):
    from megatron_vespo.checkpoint.hf_dir import save_hf_checkpoint
    from megatron_vespo.rollout.client import RolloutEngineError, SGLangClient
    from megatron_vespo.rollout.embedded.server import start_embedded_server
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync
    from megatron_vespo.weight_sync.tensor import TensorWeightSync

    out = {}
    model, hf_cfg = build_model()
    path = save_hf_checkpoint(model, hf_cfg, tmp / "fp8", dtype=_cfg().export_dtype)
    handle = start_embedded_server(str(path), mode="thread")
    loop, run = new_loop()
    client = SGLangClient(handle.url, timeout_s=60, max_retries=0)
    try:
        out["start_mismatch"] = _mismatch(handle.engine, _expected(model, hf_cfg))
        for key, cfg in (("plain", _cfg()), ("flat", _cfg(flattened_bucket=True))):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.25)
            fill_nan(handle.engine)
            sync = DistributedWeightSync(hf_cfg, cfg)
            out[key] = sync.push(model, 3, clients=[client], run=run)
            out[key + "_nan"] = nan_params(handle.engine)
            out[key + "_mismatch"] = _mismatch(handle.engine, _expected(model, hf_cfg))
            sync.disconnect(run)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.0)
        out["tensor"] = TensorWeightSync(hf_cfg, _cfg()).push(model, 4, clients=[client], run=run)
        out["tensor_mismatch"] = _mismatch(handle.engine, _expected(model, hf_cfg))
        before = engine_state(handle.engine)
        bf16 = DistributedWeightSync(hf_cfg, _cfg(dtype="bfloat16"))
        try:
            bf16.push(model, 5, clients=[client], run=run)
            out["bf16"] = "no error"
        except RolloutEngineError as exc:
            out["bf16"] = str(exc)
        out["bf16_unchanged"] = all(torch.equal(before[k], v) for k, v in engine_state(handle.engine).items())
        bf16.disconnect(run)
    finally:
        run(client.aclose())
        handle.stop()
        loop.close()
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory, parallel_teardown_module):
    return _scenario(tmp_path_factory.mktemp("fp8sync"))  # torn down by the shared fixture (tests/conftest.py)


def test_engine_starts_from_the_fp8_export(result):
    assert result["start_mismatch"] == []


def test_distributed_sync_sends_fp8_weights_and_scales(result):
    for key in ("plain", "flat"):
        assert result[key + "_nan"] == [] and result[key + "_mismatch"] == [], key
        assert result[key]["weight_sync/buckets"] > 1


def test_tensor_sync_sends_fp8_weights_and_scales(result):
    assert result["tensor_mismatch"] == []


def test_bf16_update_into_an_fp8_engine_is_refused(result):
    assert "serves block FP8" in result["bf16"] and "weight_sync.dtype=fp8" in result["bf16"]
    assert result["bf16_unchanged"]
