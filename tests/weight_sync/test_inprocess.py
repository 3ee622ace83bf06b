"""loop.weight_sync=tensor with the embedded engine in this process: tensors copied in place, no HTTP."""

from types import SimpleNamespace

import pytest
import torch
from ws_helpers import build_model, fill_nan, mismatches, nan_params, new_loop

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def one_rank(parallel_teardown_module):
    return build_model()  # torn down after the module by the shared fixture (tests/conftest.py)


def test_in_process_engine_gets_the_tensors_without_http(one_rank, monkeypatch):
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.rollout.embedded.server import start_embedded_server
    from megatron_vespo.rollout.router import EngineRouter
    from megatron_vespo.weight_sync import WeightSyncConfig, build_weight_sync
    from megatron_vespo.weight_sync.inprocess import in_process_engines

    model, hf_cfg = one_rank
    handle = start_embedded_server(preset="tiny", seed=7, mode="thread")
    loop, run = new_loop()
    client = SGLangClient(handle.url, timeout_s=60, max_retries=0)

    async def no_http(*args, **kwargs):
        raise AssertionError("the in-process engine was updated over HTTP")
    monkeypatch.setattr(SGLangClient, "update_weights_from_tensor", no_http)
    engines = SimpleNamespace(router=EngineRouter([client]), _handles=[handle], run=run, loop=loop)
    try:
        assert in_process_engines(engines) == [handle.engine]
        assert in_process_engines(None) is None
        assert in_process_engines(SimpleNamespace(router=engines.router, _handles=[SimpleNamespace(engine=None)]))\
            is None  # a child-process engine: HTTP path
        sync = build_weight_sync("tensor", root="/tmp/unused", hf_cfg=hf_cfg, cfg=WeightSyncConfig(bucket_mb=0.1))
        fill_nan(handle.engine)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.25)
        ref = export_hf_state_dict(model, hf_cfg)
        metrics = sync.update(model, 5, engines)
        assert metrics["weight_sync/in_process"] == 1.0 and metrics["weight_sync/buckets"] > 1
        assert nan_params(handle.engine) == [] and mismatches(handle.engine, ref) == []
        assert run(client.weight_version()) == "5" and client.policy_version == 5
        # a refused bucket (wrong shape) raises with the engine's message
        bad = [("model.norm.weight", torch.zeros(3))]
        monkeypatch.setattr("megatron_vespo.checkpoint.hf_weights.iter_hf_weights", lambda *a, **k: iter([bad]))
        with pytest.raises(RuntimeError, match="shape mismatch"):
            sync.update(model, 6, engines)
        assert run(client.weight_version()) == "5"
    finally:
        run(client.aclose())
        handle.stop()
        loop.close()
