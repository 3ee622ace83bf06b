"""Batched rollout transport: one /generate per engine per rollout batch, groups whole, same samples.

Mock engines check the wire (what SGLang's ``GenerateReqInput`` batch form needs); the embedded
server checks that a batched body still yields log-probs equal to HF re-scoring and routes
identical to the reference, and that it runs as one engine batch without the batching wait.
"""

import asyncio
import json
import threading

import httpx
import pytest

from megatron_vespo.rollout.client import EngineHTTPError, SGLangClient
from megatron_vespo.rollout.config import RolloutConfig, SamplingConfig
from megatron_vespo.rollout.embedded.engine import EmbeddedEngine
from megatron_vespo.rollout.embedded.models import build_tiny_model, load_hf_model, save_tiny_checkpoint
from megatron_vespo.rollout.embedded.server import start_embedded_server
from megatron_vespo.rollout.protocol import batch_log_probs, build_batch_payload, response_to_sample
from megatron_vespo.rollout.router import EngineRouter
from megatron_vespo.rollout.routes import RouteSpec, routes_equal
from megatron_vespo.types import SampleStatus
from tests.rollout.test_rollout_client import fake_generate
from tests.rollout.test_rollout_embedded import rescore

SPEC = RouteSpec(num_layers=2, topk=2, num_experts=8)


def batch_answer(body):
    """SGLang's answer to a batch body: a list, one single-shaped answer per row, in order."""
    rows = body["input_ids"]
    return [fake_generate({"input_ids": ids, "sampling_params": sp, "rid": rid,
                           "return_routed_experts": body["return_routed_experts"]})
            for ids, sp, rid in zip(rows, body["sampling_params"], body["rid"])]


def test_router_sends_one_batched_request_per_engine_with_whole_groups_and_router_seeds():
    bodies = {"a": [], "b": []}

    def make(name):
        def handler(request):
            body = json.loads(request.content)
            bodies[name].append(body)
            return httpx.Response(200, json=batch_answer(body))
        return handler

    async def go(batched):
        clients = [SGLangClient(f"http://{n}:1", transport=httpx.MockTransport(make(n)), route_spec=SPEC,
                                return_routed_experts=True) for n in ("a", "b")]
        router = EngineRouter(clients)
        out = await router.generate_groups([[1, 2], [3, 4, 5], [6]], SamplingConfig(max_new_tokens=2,
                                                                                     sampling_seed=40),
                                           4, first_group=10, metadata=[{"label": i} for i in range(3)],
                                           batched=batched)
        await router.aclose()
        return out
    samples = asyncio.run(go(True))
    assert len(bodies["a"]) == 1 and len(bodies["b"]) == 1  # one request per engine
    for body in bodies["a"] + bodies["b"]:
        rows = body["input_ids"]
        assert isinstance(rows[0], list) and len(body["sampling_params"]) == len(rows) == len(body["rid"])
        assert len(set(body["rid"])) == len(rows) and body["return_logprob"] and body["logprob_start_len"] == -1
        # whole groups: every prompt appears a multiple of 4 times on one engine
        assert all(rows.count(r) % 4 == 0 for r in rows)
    seeds = sorted(sp["sampling_seed"] for b in bodies["a"] + bodies["b"] for sp in b["sampling_params"])
    assert seeds == list(range(40, 52))
    # results in prompt-major order, group indices offset, metadata carried, seeds prompt-major
    assert [s.group_index for s in samples] == [10] * 4 + [11] * 4 + [12] * 4
    assert [s.prompt_tokens for s in samples] == [[1, 2]] * 4 + [[3, 4, 5]] * 4 + [[6]] * 4
    assert [s.metadata["label"] for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(s.status == SampleStatus.TRUNCATED and s.routed_experts is not None for s in samples)
    # the single-request path (SGLang's router) asks for the same seeds, one body per sample
    bodies["a"].clear()
    bodies["b"].clear()

    def single(request):
        body = json.loads(request.content)
        bodies["a"].append(body)
        return httpx.Response(200, json=fake_generate(body))

    async def go_single():
        router = EngineRouter([SGLangClient("http://s:1", transport=httpx.MockTransport(single))])
        out = await router.generate_groups([[1, 2], [3, 4, 5]], SamplingConfig(max_new_tokens=2, sampling_seed=40),
                                           2, batched=False)
        await router.aclose()
        return out
    samples = asyncio.run(go_single())
    assert [b["sampling_params"]["sampling_seed"] for b in bodies["a"]] == [40, 41, 42, 43]
    assert all(isinstance(b["input_ids"][0], int) for b in bodies["a"])
    assert [s.group_index for s in samples] == [0, 0, 1, 1]


def test_batched_answer_of_wrong_shape_is_an_error_naming_the_setting():
    def handler(request):
        body = json.loads(request.content)
        return httpx.Response(200, json=batch_answer(body)[:-1])

    async def go():
        async with SGLangClient("http://x:1", transport=httpx.MockTransport(handler)) as c:
            await c.generate_many([[1], [2]], [{"max_new_tokens": 1}] * 2, group_indices=[0, 0])
    with pytest.raises(EngineHTTPError, match="rollout.batch_requests"):
        asyncio.run(go())
    with pytest.raises(ValueError, match="unique"):
        build_batch_payload([[1], [2]], [{}, {}], rids=["a", "a"])
    with pytest.raises(ValueError, match="input_ids\\[1\\] is empty"):
        build_batch_payload([[1], []], [{}, {}])


def test_numpy_log_prob_decode_flags_what_the_per_token_check_flagged():
    def resp(entries, out=(7, 8)):
        return {"output_ids": list(out), "meta_info": {"id": "r", "finish_reason": {"type": "length"},
                                                       "output_token_logprobs": entries}}
    ok = response_to_sample(resp([[-0.5, 7, None], [-1.25, 8, "x"]]), [1])
    assert ok.status == SampleStatus.TRUNCATED and ok.rollout_log_probs.tolist() == [-0.5, -1.25]
    cases = {"is for token 9": [[-0.5, 7, None], [-1.0, 9, None]],
             "not a finite": [[-0.5, 7, None], [None, 8, None]],
             "= 0.5 is not": [[0.5, 7, None], [-1.0, 8, None]],
             "expected [logprob, token_id, text]": [[-0.5, 7, None], [-1.0]],
             "is for token 7.5": [[-0.5, 7.5, None], [-1.0, 8, None]]}
    for needle, entries in cases.items():
        s = response_to_sample(resp(entries), [1])
        assert s.status == SampleStatus.FLAGGED and s.rollout_log_probs is None, needle
        assert needle in s.metadata["flag_reasons"][0], (needle, s.metadata["flag_reasons"])


def test_batched_answer_is_decoded_in_one_pass_and_bad_rows_still_flagged():
    """batch_log_probs: one numpy pass over the whole answer; any bad row hands the batch back to the per-row
    check, so a good row gets its log-probs and a bad row the same flag as before."""
    def resp(entries, out):
        return {"output_ids": list(out), "meta_info": {"id": "r", "finish_reason": {"type": "stop"},
                                                       "output_token_logprobs": entries}}
    good = [resp([[-0.5, 7, None], [-1.25, 8, None]], (7, 8)), resp([], ()), resp([[-2.0, 3, "t"]], (3,))]
    lps = batch_log_probs(good)
    assert [x.tolist() for x in lps] == [[-0.5, -1.25], [], [-2.0]]
    assert batch_log_probs(good + [resp([[-0.5, 9, None]], (7,))]) is None
    assert batch_log_probs(good + [resp([[float("nan"), 7, None]], (7,))]) is None
    assert batch_log_probs(good + [resp([[-0.5, 7]], (7, 8))]) is None

    bad = resp([[-0.5, 7, None], [-1.0, 9, None]], (7, 8))
    answer = [good[0], bad, good[2]]
    client = SGLangClient("http://127.0.0.1:1")

    async def fake_request(*a, **kw):
        return answer
    client.request = fake_request
    samples = asyncio.run(client.generate_many([[1], [1], [1]], [{}, {}, {}], group_indices=[0, 0, 0]))
    assert samples[0].rollout_log_probs.tolist() == [-0.5, -1.25] and samples[2].rollout_log_probs.tolist() == [-2.0]
    assert samples[1].status == SampleStatus.FLAGGED and "is for token 9" in samples[1].metadata["flag_reasons"][0]
    answer[1] = resp([[-0.75, 7, None], [-1.0, 8, None]], (7, 8))
    samples = asyncio.run(client.generate_many([[1], [1], [1]], [{}, {}, {}], group_indices=[0, 0, 0]))
    assert [s.rollout_log_probs.tolist() for s in samples] == [[-0.5, -1.25], [-0.75, -1.0], [-2.0]]
    assert all(s.status != SampleStatus.FLAGGED for s in samples)


def test_complete_batch_starts_without_the_batching_wait_and_runs_as_one_batch():
    engine = EmbeddedEngine(build_tiny_model("tiny", seed=0), max_batch_size=64, batch_wait_s=3600.0).start()
    sizes = []
    run = engine.run_batch
    engine.run_batch = lambda reqs: (sizes.append(len(reqs)), run(reqs))[1]
    try:
        body = {"input_ids": [[5 + i, 6] for i in range(40)], "sampling_params": {"max_new_tokens": 2}}
        reqs, batched = engine.parse(body)
        assert batched
        done = threading.Event()
        left = [len(reqs)]

        def finished(_req):
            left[0] -= 1
            if not left[0]:
                done.set()
        for r in reqs:
            r.on_done = finished
        engine.submit(reqs, complete=True)
        assert done.wait(120), "a whole batched request waited for the batching window"
        assert sizes == [40]
    finally:
        engine.shutdown()


def test_rollout_config_exposes_engine_batching():
    cfg = RolloutConfig(max_batch_size=128, batch_wait_ms=0)
    assert cfg.batch_requests and cfg.max_batch_size == 128 and cfg.batch_wait_ms == 0
    with pytest.raises(ValueError):
        RolloutConfig(max_batch_size=0)


@pytest.mark.e2e
def test_batched_body_over_http_matches_hf_rescoring_and_routes(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "m", seed=0)
    handle = start_embedded_server(str(path), random_seed=0, max_batch_size=64, batch_wait_ms=3600_000)
    model = load_hf_model(path)
    from megatron_vespo.rollout.embedded.capture import RouterCapture

    ref = (model, RouterCapture(model))
    try:
        async def go():
            spec = RouteSpec.from_hf_config({"num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2})
            router = EngineRouter([SGLangClient(handle.url, route_spec=spec, return_routed_experts=True,
                                                timeout_s=120)])
            out = await router.generate_groups([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]],
                                               SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=12,
                                                              sampling_seed=3), 3)
            await router.aclose()
            return out
        samples = asyncio.run(go())  # would time out (1 h wait) if the batch body did not start at once
    finally:
        handle.stop()
    assert len(samples) == 9
    for s in samples:
        assert s.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED), s.metadata
        mu, routes, _ = rescore(ref, s.tokens, len(s.prompt_tokens), 0.8)
        assert (s.rollout_log_probs - mu).abs().max().item() < 1e-5
        assert routes_equal(s.routed_experts, routes, sort_topk=False)


def test_thread_server_connections_do_not_wait_for_delayed_acks():
    """The thread-mode server binds its own socket (proto 0), which asyncio's transports do not set
    TCP_NODELAY on: the tail of each response then waited ~40 ms for the client's delayed ACK on
    back-to-back requests. The connection the server accepts must have Nagle off."""
    import socket

    handle = start_embedded_server(preset="tiny", random_seed=0)
    try:
        host, port = handle.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(1024).startswith(b"HTTP/1.1 200")
            peer = client.getsockname()
            server_side = [s for srv in handle._server.servers for s in srv.sockets]
            assert server_side and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in server_side)
            conns = [c for c in _accepted(handle) if c.getpeername() == peer]
            assert conns and all(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in conns)
    finally:
        handle.stop()


def _accepted(handle):
    """The sockets of the connections the uvicorn server holds open."""
    out = []
    for conn in getattr(handle._server.server_state, "connections", ()):
        sock = conn.transport.get_extra_info("socket") if getattr(conn, "transport", None) else None
        if sock is not None:
            out.append(sock)
    return out
