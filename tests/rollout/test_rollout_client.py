"""SGLangClient / EngineRouter against mock and misbehaving engines: retries, timeouts, errors, routing."""

import asyncio
import base64
import json
import socket
import threading

import httpx
import pytest
import torch

from megatron_vespo.rollout.client import (
    EngineHTTPError,
    EngineTimeoutError,
    EngineUnreachableError,
    RolloutEngineError,
    SGLangClient,
)
from megatron_vespo.rollout.config import RolloutConfig, SamplingConfig
from megatron_vespo.rollout.process import find_free_port
from megatron_vespo.rollout.router import EngineRouter
from megatron_vespo.rollout.routes import RouteSpec
from megatron_vespo.types import SampleStatus

SPEC = RouteSpec(num_layers=2, topk=2, num_experts=8)


def fake_generate(body, version="0", routes=True, delay=0.0):
    """A minimal SGLang-shaped answer to one /generate body."""
    prompt = body["input_ids"]
    out = [7, 8, 9][: body["sampling_params"]["max_new_tokens"]]
    meta = {"id": body.get("rid"), "finish_reason": {"type": "length", "length": len(out)},
            "prompt_tokens": len(prompt), "completion_tokens": len(out), "weight_version": version,
            "output_token_logprobs": [[-1.0, t, None] for t in out]}
    if routes and body.get("return_routed_experts"):
        r = torch.zeros(len(prompt) + len(out) - 1, 2, 2, dtype=torch.int32)
        meta["routed_experts"] = base64.b64encode(r.numpy().tobytes()).decode()
    return {"output_ids": out, "meta_info": meta}


def client_with(handler, **kw):
    kw.setdefault("backoff_s", 0.001)
    return SGLangClient("http://engine.test:1234", transport=httpx.MockTransport(handler), **kw)


def run(coro):
    return asyncio.run(coro)


def test_unreachable_server_names_url_after_retries():
    port = find_free_port()  # nothing listens there

    async def go():
        async with SGLangClient(f"http://127.0.0.1:{port}", max_retries=2, backoff_s=0.01) as c:
            assert not await c.health()
            await c.generate([1, 2], SamplingConfig(max_new_tokens=2))
    with pytest.raises(EngineUnreachableError, match=f"127.0.0.1:{port}/generate"):
        run(go())


def test_retries_connection_errors_and_5xx_then_succeeds():
    calls = []

    def handler(request):
        calls.append(request.url.path)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            return httpx.Response(503, text="overloaded")
        return httpx.Response(200, json=fake_generate(json.loads(request.content)))

    async def go():
        async with client_with(handler, max_retries=3) as c:
            return await c.generate([1, 2, 3], SamplingConfig(max_new_tokens=3))
    s = run(go())
    assert len(calls) == 3 and s.status == SampleStatus.TRUNCATED and s.response_tokens == [7, 8, 9]


def test_5xx_exhausts_retries_and_4xx_is_not_retried():
    calls = []

    def handler(request):
        calls.append(1)
        code = 500 if request.url.path == "/generate" else 400
        return httpx.Response(code, json={"error": {"message": "bad things"}})

    async def go(path):
        async with client_with(handler, max_retries=2) as c:
            if path == "generate":
                await c.generate([1], {"max_new_tokens": 1})
            else:
                await c.pause_generation("abort")
    with pytest.raises(EngineHTTPError, match="HTTP 500.*bad things") as exc:
        run(go("generate"))
    assert exc.value.status_code == 500 and len(calls) == 3
    calls.clear()
    with pytest.raises(EngineHTTPError, match="HTTP 400"):
        run(go("pause"))
    assert len(calls) == 1


def test_timeout_on_a_silent_server_names_url():
    """A real socket that accepts and never answers: the client must time out, not hang."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()

    async def go():
        async with SGLangClient(f"http://127.0.0.1:{port}", timeout_s=0.5, max_retries=3) as c:
            await c.generate([1], {"max_new_tokens": 1})
    try:
        with pytest.raises(EngineTimeoutError, match=f"127.0.0.1:{port}/generate timed out"):
            run(go())
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()


def test_r3_response_without_routes_is_flagged_not_raised():
    def handler(request):
        return httpx.Response(200, json=fake_generate(json.loads(request.content), routes=False))

    async def go():
        async with client_with(handler, route_spec=SPEC, return_routed_experts=True) as c:
            return await c.generate([1, 2], SamplingConfig(max_new_tokens=2))
    s = run(go())
    assert s.status == SampleStatus.FLAGGED and s.routed_experts is None
    with pytest.raises(ValueError, match="route_spec"):
        SGLangClient("http://x:1", return_routed_experts=True)
    with pytest.raises(ValueError, match="http://"):
        SGLangClient("engine:30000")


def test_payload_seeds_versions_and_concurrency_limit():
    seen, inflight, peak = [], [0], [0]

    async def handler(request):
        body = json.loads(request.content) if request.content else {}
        if request.url.path == "/update_weights_from_disk":
            seen.append(body)
            return httpx.Response(200, json={"success": True, "message": "ok", "num_paused_requests": 0})
        inflight[0] += 1
        peak[0] = max(peak[0], inflight[0])
        await asyncio.sleep(0.01)
        inflight[0] -= 1
        seen.append(body)
        return httpx.Response(200, json=fake_generate(body, version="default", routes=True))

    async def go():
        async with client_with(handler, route_spec=SPEC, return_routed_experts=True, max_concurrency=3) as c:
            await c.update_weights_from_disk("/ckpt/step_5", policy_version=5)
            return await c.generate_batch([[1, 2], [3, 4, 5]], SamplingConfig(max_new_tokens=3, sampling_seed=100), 4)
    samples = run(go())
    assert peak[0] <= 3
    assert seen[0] == {"model_path": "/ckpt/step_5", "weight_version": "5", "abort_all_requests": False,
                       "flush_cache": True}
    gens = seen[1:]
    assert sorted(b["sampling_params"]["sampling_seed"] for b in gens) == list(range(100, 108))
    assert all(b["return_routed_experts"] and b["return_logprob"] and b["logprob_start_len"] == -1 for b in gens)
    # engine reports "default": the client's known version (5, set by the update) tags the samples
    assert [s.policy_version for s in samples] == [5] * 8
    assert [s.group_index for s in samples] == [0] * 4 + [1] * 4
    assert all(s.status == SampleStatus.TRUNCATED for s in samples)


def test_failed_weight_update_raises():
    def handler(request):
        return httpx.Response(200, json={"success": False, "message": "no such dir"})

    async def go():
        async with client_with(handler) as c:
            await c.update_weights_from_disk("/nope", 1)
    with pytest.raises(RolloutEngineError, match="no such dir"):
        run(go())


def test_model_info_falls_back_to_deprecated_endpoint_and_fetches_route_spec(tmp_path):
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2}')

    def handler(request):
        if request.url.path == "/model_info":
            return httpx.Response(404, text="Not Found")
        return httpx.Response(200, json={"model_path": str(tmp_path), "weight_version": "7"})

    async def go():
        async with client_with(handler) as c:
            return await c.weight_version(), await c.fetch_route_spec()
    version, spec = run(go())
    assert version == "7" and spec == SPEC


def test_router_policies_and_broadcast():
    hits = {"a": [], "b": []}

    def make(name, slow):
        async def handler(request):
            body = json.loads(request.content) if request.content else {}
            hits[name].append(request.url.path)
            if request.url.path == "/generate" and slow:
                await asyncio.sleep(0.2)
            if request.url.path == "/generate":
                return httpx.Response(200, json=fake_generate(body))
            return httpx.Response(200, json={"success": True, "message": "ok"})
        return handler

    async def go(policy):
        a = SGLangClient("http://a:1", transport=httpx.MockTransport(make("a", slow=True)))
        b = SGLangClient("http://b:1", transport=httpx.MockTransport(make("b", slow=False)))
        router = EngineRouter([a, b], policy)
        first = asyncio.create_task(router.generate([1], {"max_new_tokens": 1}))
        await asyncio.sleep(0.05)  # a is busy with the first request now (if it got it)
        rest = [await router.generate([1], {"max_new_tokens": 1}) for _ in range(4)]
        await first
        await router.update_weights_from_disk("/ckpt", 3)
        await router.aclose()
        return rest
    run(go("round_robin"))
    assert hits["a"].count("/generate") == 3 and hits["b"].count("/generate") == 2
    assert hits["a"][-1] == hits["b"][-1] == "/update_weights_from_disk"
    hits["a"].clear()
    hits["b"].clear()
    run(go("least_outstanding"))
    # the first request went to a (idle tie -> round-robin); while it runs, every other goes to b
    assert hits["a"].count("/generate") == 1 and hits["b"].count("/generate") == 4
    with pytest.raises(ValueError, match="at least one"):
        EngineRouter([])
    cfg = RolloutConfig(router_policy="round_robin", max_concurrency=4)
    r = EngineRouter.from_config(cfg, ["http://h1:1", "http://h2:2"])
    assert r.urls == ["http://h1:1", "http://h2:2"] and r.policy == "round_robin"
    run(r.aclose())


def test_router_gives_distinct_seeds_across_engines():
    seeds = []

    def handler(request):
        body = json.loads(request.content)
        seeds.append(body["sampling_params"]["sampling_seed"])
        return httpx.Response(200, json=fake_generate(body))

    async def go():
        clients = [SGLangClient(f"http://e{i}:1", transport=httpx.MockTransport(handler)) for i in range(2)]
        router = EngineRouter(clients, "round_robin")
        await router.generate_batch([[1, 2]], SamplingConfig(max_new_tokens=2, sampling_seed=40), 4)
        await router.aclose()
    run(go())
    assert sorted(seeds) == [40, 41, 42, 43]  # not [40, 40, 41, 41]: same prompt, two engines
