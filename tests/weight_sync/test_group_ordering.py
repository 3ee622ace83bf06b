"""NCCL group ordering: the engine joins the broadcast only after it receives the HTTP request.

With NCCL the trainer's first broadcast builds the communicator and blocks its thread until every
engine rank joins; SGLang's engines join inside the first ``/update_weights_from_distributed``.
Here the engine is a separate process (``tools/ws_stand_in_engine.py``) that builds its gloo
backend only when that request arrives, and the trainer's group (``LazyGlooGroup``) builds its gloo backend inside
the first broadcast, blocking the caller until the engine has joined -- NCCL's behaviour on gloo.

Regression: the old ``DistributedWeightSync._send`` scheduled the POSTs, yielded once, then
broadcast on the event-loop thread that was to send them: the request never left, the engine
never joined, and the sync hung until the rendezvous timed out.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

TINY = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32, "moe_intermediate_size": 8,
        "num_experts": 2, "num_experts_per_tok": 1, "tie_word_embeddings": False, "model_type": "qwen3_moe"}
BUCKETS = [[("model.embed_tokens.weight", torch.arange(64 * 16, dtype=torch.float32).reshape(64, 16) / 7)],
           [("model.norm.weight", torch.linspace(-1, 1, 16).to(torch.bfloat16)),
            ("lm_head.weight", torch.full((64, 16), 0.5))]]


def _lazy_group_class():
    from megatron_vespo.weight_sync.group import TrainerGroup

    class LazyGlooGroup(TrainerGroup):
        """gloo with NCCL's timing: ``connect`` returns at once, the first broadcast builds the backend and
        blocks the calling thread until every rank has joined."""

        def connect(self):
            pass

        def broadcast(self, tensors):
            if self.pg is None:
                self.pg = torch.distributed.ProcessGroupGloo(self._prefixed_store(), 0, self.world_size,
                                                             self.op_timeout)
            return super().broadcast(tensors)

    return LazyGlooGroup


@pytest.fixture()
def lazy_engine(request):
    from megatron_vespo.utils.net import free_port

    port = free_port()
    version = getattr(request, "param", "0.5.20")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    script = Path(__file__).parents[2] / "tools" / "ws_stand_in_engine.py"
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--version", version], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("stand-in engine did not start")
    yield url
    proc.kill()
    proc.wait(timeout=30)


def _push(url, monkeypatch, flattened):
    import megatron_vespo.checkpoint.hf_weights as export
    import megatron_vespo.weight_sync.distributed as distributed
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.weight_sync.config import WeightSyncConfig

    monkeypatch.setattr(distributed, "TrainerGroup", _lazy_group_class())
    monkeypatch.setattr(export, "iter_hf_weights", lambda *a, **k: iter(BUCKETS))
    import asyncio

    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    client = SGLangClient(url, timeout_s=60, max_retries=0)
    cfg = WeightSyncConfig(backend="gloo", master_address="127.0.0.1", init_timeout_s=10, op_timeout_s=15,
                           flattened_bucket=flattened)
    sync = distributed.DistributedWeightSync(TINY, cfg)
    try:
        metrics = sync.push(None, 7, clients=[client], run=run)
        received = httpx.get(f"{url}/received", timeout=10, trust_env=False).json()
        sync.disconnect(run)
    finally:
        run(client.aclose())
        loop.close()
    return metrics, received, client


@pytest.mark.parametrize("flattened", [True, False])
def test_engine_joining_on_first_request_does_not_deadlock(lazy_engine, monkeypatch, flattened):
    metrics, received, client = _push(lazy_engine, monkeypatch, flattened)
    want = {n: [float(t.double().sum()), list(t.shape)] for b in BUCKETS for n, t in b}
    assert received == want
    assert metrics["weight_sync/buckets"] == 2
    assert client.policy_version == 7


@pytest.mark.parametrize("lazy_engine", ["0.5.23"], indirect=True)
def test_window_opened_on_new_engine_process(lazy_engine, monkeypatch):
    """The same push against a stand-in reporting 0.5.23 (updates refused outside begin/end)."""
    metrics, received, _ = _push(lazy_engine, monkeypatch, True)
    assert len(received) == 3 and metrics["weight_sync/buckets"] == 2
