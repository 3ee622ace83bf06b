"""Bad requests are 400s naming the field, never 500s; one bad request never hurts another.

Against a real embedded server on 127.0.0.1 (thread mode, random tiny model): the malformed
bodies of issue 9, a bad seed batched with good requests, clients that disconnect mid-generation,
and a bounded, seeded fuzzing run over ``/generate`` and the control endpoints.
"""

import asyncio
import json
import math
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_vespo.rollout.embedded.server import start_embedded_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    handle = start_embedded_server(preset="tiny", random_seed=0, max_batch_size=32)
    yield handle
    handle.stop()


def post(server, path, body, raw=False, timeout=60):
    content = body if raw else json.dumps(body)  # json.dumps writes NaN / Infinity as Python's json does
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"},
                      timeout=timeout, trust_env=False)


def idle(server, bound_s=120.0):
    deadline = time.monotonic() + bound_s
    while (server.engine.busy or server.engine._pending) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not server.engine.busy


OK = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2}}
BAD = [
    ("/generate", {"input_ids": {"a": 1}}, "input_ids"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": "greedy"}, "sampling_params"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": 3}, "sampling_params"),
    ("/generate", {"input_ids": [[1, 2], [3]], "sampling_params": [{"max_new_tokens": 1}]}, "sampling_params"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": [{}, {}]}, "sampling_params"),
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"temperature": NaN}}', "temperature"),
    ("/generate", '{"input_ids": [1, 2], "sampling_params": {"max_new_tokens": Infinity}}', "max_new_tokens"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"sampling_seed": 2**64}}, "sampling_seed"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": "3"}}, "max_new_tokens"),
    ("/generate", {"input_ids": [1, 2.5]}, "input_ids"),
    ("/generate", {"input_ids": [1, 2], "rid": ["a", "b"]}, "rid"),
    ("/generate", {"input_ids": [1, 2], "return_logprob": "yes"}, "return_logprob"),
    ("/generate", "[1, 2, 3]", "JSON object"),
    ("/generate", "{not json", "not valid JSON"),
    ("/abort_request", "{not json", "not valid JSON"),
    ("/abort_request", "[1]", "JSON object"),
    ("/abort_request", {"rid": 5}, "rid"),
    ("/pause_generation", "{not json", "not valid JSON"),
    ("/pause_generation", '["abort"]', "JSON object"),
    ("/pause_generation", {"mode": "sideways"}, "mode"),
    ("/update_weight_version", {}, "new_version"),
    ("/update_weight_version", {"new_version": 7}, "new_version"),
    ("/update_weights_from_disk", [], "JSON object"),
    ("/update_weights_from_disk", {"model_path": 3}, "model_path"),
    ("/update_weights_from_tensor", {"serialized_named_tensors": "abc"}, "serialized_named_tensors"),
    ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": "x", "rank_offset": 1,
                                    "world_size": 2}, "master_port"),
    ("/begin_weight_update", "[1]", "JSON object"),
    ("/begin_weight_update", {"selector": "everything"}, "selector"),
]


@pytest.mark.parametrize("path, body, field", BAD, ids=[f"{p}:{i}" for i, (p, _, _) in enumerate(BAD)])
def test_malformed_bodies_are_400_naming_the_field(server, path, body, field):
    r = post(server, path, body, raw=isinstance(body, str))
    assert r.status_code == 400, (r.status_code, r.text)
    assert field in r.text, r.text
    assert post(server, "/generate", OK).status_code == 200  # and the server still serves


# SGLang's native handlers take a FastAPI body model: FastAPI reads the body as JSON only when its
# content-type says JSON (and, with the default strict_content_type, not when there is none)
BODY_ENDPOINTS = [("/generate", OK), ("/abort_request", {"rid": "nobody"}), ("/pause_generation", {"mode": "abort"}),
                  ("/update_weight_version", {"new_version": "v"}), ("/update_weights_from_disk", {"model_path": "/x"}),
                  ("/update_weights_from_tensor", {"serialized_named_tensors": ["x"]}),
                  ("/begin_weight_update", {"selector": "all"}), ("/destroy_weights_update_group", {})]


@pytest.mark.parametrize("path, body", BODY_ENDPOINTS, ids=[p for p, _ in BODY_ENDPOINTS])
@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_not_sent_as_json_is_refused_as_sglang_does(server, path, body, ctype):
    headers = {} if ctype is None else {"content-type": ctype}
    r = httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=headers, timeout=60, trust_env=False)
    assert r.status_code == 400, (r.status_code, r.text)
    assert "JSON" in r.text and "application/json" in r.text, r.text
    assert post(server, "/generate", OK).status_code == 200


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "Application/JSON", "application/vnd.sgl+json"])
def test_json_content_types_with_parameters_or_suffixes_are_read(server, ctype):
    r = httpx.post(f"{server.url}/generate", content=json.dumps(OK), headers={"content-type": ctype}, timeout=60,
                   trust_env=False)
    assert r.status_code == 200, r.text
    assert len(r.json()["output_ids"]) == 2


@pytest.mark.parametrize("path", ["/generate", "/abort_request", "/update_weight_version", "/update_weights_from_disk",
                                  "/update_weights_from_tensor", "/init_weights_update_group"])
def test_a_missing_body_is_400_where_sglang_requires_one(server, path):
    r = httpx.post(f"{server.url}{path}", headers={"content-type": "application/json"}, timeout=60, trust_env=False)
    assert r.status_code == 400, (r.status_code, r.text)
    assert "required" in r.text, r.text


def test_an_empty_body_keeps_the_defaults_where_sglang_has_no_body_model(server):
    r = httpx.post(f"{server.url}/pause_generation", timeout=60, trust_env=False)
    try:
        assert r.status_code == 200, r.text
        assert server.engine.paused
    finally:
        assert httpx.post(f"{server.url}/continue_generation", timeout=60, trust_env=False).status_code == 200
    assert post(server, "/generate", OK).status_code == 200


def test_a_bad_seed_does_not_fail_the_requests_batched_with_it(server):
    good = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True, "sampling_seed": 1}}
    bad = {**good, "sampling_params": {**good["sampling_params"], "sampling_seed": 2**64}}

    async def go():
        async with httpx.AsyncClient(timeout=60, trust_env=False) as c:
            return await asyncio.gather(*[c.post(f"{server.url}/generate", json=b) for b in [good, bad, good, good]])
    rs = asyncio.run(go())
    assert rs[1].status_code == 400 and "sampling_seed" in rs[1].text
    for r in (rs[0], rs[2], rs[3]):
        assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "length", r.text


def test_disconnected_clients_free_the_engine(server):
    """20 clients ask for 500 tokens each and hang up after 0.3 s: their requests are aborted."""
    n, max_new = 20, 500
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}}
    assert idle(server)
    before = server.engine.generated_tokens

    async def go():
        async with httpx.AsyncClient(timeout=0.3, trust_env=False) as c:
            rs = await asyncio.gather(*[c.post(f"{server.url}/generate", json=body) for _ in range(n)],
                                      return_exceptions=True)
        return rs
    rs = asyncio.run(go())
    assert all(isinstance(r, httpx.TimeoutException) for r in rs), rs
    assert idle(server), "engine still busy with requests of clients that left"
    generated = server.engine.generated_tokens - before
    assert generated < n * max_new // 2, f"{generated} tokens generated for {n} disconnected clients"
    assert post(server, "/generate", OK).status_code == 200


# ---------------------------------------------------------------- fuzzing
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 4), st.sampled_from([2**63, 2**64, -(2**64), 10**30]),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=3), inner, max_size=2)),
                       max_leaves=6)
_sp_keys = ["temperature", "top_p", "top_k", "max_new_tokens", "sampling_seed", "stop_token_ids", "ignore_eos", "n",
            "min_p", "frequency_penalty", "repetition_penalty", "min_new_tokens", "regex"]
_sampling = st.one_of(_values, st.dictionaries(st.sampled_from(_sp_keys), _values, max_size=4),
                      st.lists(st.dictionaries(st.sampled_from(_sp_keys), _scalars, max_size=3), max_size=3))
_ids = st.one_of(_values, st.lists(st.integers(-2, 300), max_size=4),
                 st.lists(st.lists(st.integers(-1, 300), max_size=3), max_size=3))
_top = ["rid", "return_logprob", "logprob_start_len", "return_routed_experts", "routed_experts_start_len", "stream",
        "text", "top_logprobs_num", "return_text_in_logprobs", "image_data"]
_generate = st.one_of(
    _values,
    st.fixed_dictionaries({"input_ids": _ids, "sampling_params": _sampling},
                          optional={k: _values for k in _top}),
)
_control = st.one_of(_values, st.dictionaries(
    st.sampled_from(["rid", "abort_all", "mode", "new_version", "abort_all_requests", "model_path", "load_format",
                     "weight_version", "serialized_named_tensors", "names", "dtypes", "shapes", "group_name"]),
    _values, max_size=3))
_paths = ["/abort_request", "/pause_generation", "/update_weight_version", "/update_weights_from_disk",
          "/update_weights_from_tensor", "/update_weights_from_distributed", "/destroy_weights_update_group"]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(gen=_generate, path=st.sampled_from(_paths), ctl=_control)
def test_fuzzed_requests_never_answer_5xx(server, gen, path, ctl):
    """Seeded (derandomize) and bounded (150 examples): any body to /generate or a control endpoint is < 500.

    Every body is sent as JSON text (NaN / Infinity included, as Python clients produce them).
    """
    if isinstance(gen, dict) and isinstance(gen.get("sampling_params"), dict):
        mnt = gen["sampling_params"].get("max_new_tokens")
        if isinstance(mnt, int) and not isinstance(mnt, bool) and mnt > 8:  # keep each example cheap
            gen["sampling_params"]["max_new_tokens"] = 8
    r = post(server, "/generate", json.dumps(gen), raw=True)
    assert r.status_code < 500, (gen, r.text)
    r = post(server, path, json.dumps(ctl), raw=True)
    assert r.status_code < 500, (path, ctl, r.text)
    post(server, "/continue_generation", {})  # a valid pause body would hold later examples
    assert math.isfinite(server.engine.generated_tokens)


def test_server_answers_after_fuzzing(server):
    post(server, "/continue_generation", {})
    assert httpx.get(f"{server.url}/health", timeout=10, trust_env=False).status_code == 200
    r = post(server, "/generate", OK)
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 2


def test_engine_isolates_a_request_whose_seed_fails_inside_a_batch():
    """Defence in depth behind the schema: a seed torch refuses fails its own request only."""
    from megatron_vespo.rollout.embedded.engine import EmbeddedEngine

    engine = EmbeddedEngine.from_preset("tiny")
    reqs = [engine.parse({"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True,
                                                                        "sampling_seed": i}})[0][0] for i in range(3)]
    reqs[1].sampling_seed = 2**64  # what the schema refuses at the door
    engine.run_batch(reqs)
    assert reqs[1].finish_reason["type"] == "abort" and reqs[1].finish_reason["status_code"] == 400
    assert "sampling_seed" in reqs[1].finish_reason["message"]
    assert [r.finish_reason["type"] for r in (reqs[0], reqs[2])] == ["length", "length"]
    assert all(len(r.output_ids) == 3 for r in (reqs[0], reqs[2]))
