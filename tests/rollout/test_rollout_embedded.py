"""End to end on CPU: embedded server (real HTTP on 127.0.0.1) + client, checked against HF re-scoring.

The reference for mu and for the routes is a plain full-sequence forward of the same HF
checkpoint (no KV cache, no padding) with hooks on the routers: the engine's batched,
left-padded, KV-cached decode must reproduce both.
"""

import asyncio
import time

import httpx
import pytest
import torch

from megatron_vespo.rollout.client import EngineHTTPError, RolloutEngineError, SGLangClient
from megatron_vespo.rollout.config import SamplingConfig
from megatron_vespo.rollout.embedded.capture import RouterCapture
from megatron_vespo.rollout.embedded.models import load_hf_model, save_tiny_checkpoint
from megatron_vespo.rollout.embedded.server import start_embedded_server
from megatron_vespo.rollout.routes import RouteSpec, routes_equal
from megatron_vespo.types import SampleStatus

pytestmark = pytest.mark.e2e

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return save_tiny_checkpoint(root / "a", seed=0), save_tiny_checkpoint(root / "b", seed=1)


@pytest.fixture(scope="module")
def server(ckpts):
    handle = start_embedded_server(str(ckpts[0]), random_seed=0, max_batch_size=16)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def refs(ckpts):
    out = []
    for path in ckpts:
        model = load_hf_model(path)
        out.append((model, RouterCapture(model)))
    return out


def rescore(ref, tokens, prompt_len, temperature):
    """(mu of the response under SGLang's convention, routes [n-1, L, K]) from one full forward."""
    model, cap = ref
    cap.start()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    routes = cap.collect(1, len(tokens))[0, :-1]
    cap.stop()
    lsm = torch.log_softmax(logits / temperature, dim=-1)
    resp = torch.tensor(tokens[prompt_len:])
    return lsm[prompt_len - 1:-1].gather(-1, resp[:, None])[:, 0], routes, logits


def client(server, r3=True, **kw):
    spec = RouteSpec.from_hf_config({"num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2})
    kw.setdefault("timeout_s", 60)
    return SGLangClient(server.url, route_spec=spec, return_routed_experts=r3, **kw)


def generate(server, prompts, sampling, n=1, **kw):
    async def go():
        async with client(server, **kw) as c:
            return await c.generate_batch(prompts, sampling, n)
    return asyncio.run(go())


def test_log_probs_and_routes_match_hf_rescoring(server, refs):
    sampling = SamplingConfig(temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=24, sampling_seed=11)
    samples = generate(server, PROMPTS, sampling, n=2)
    worst = 0.0
    for s in samples:
        assert s.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED), s.metadata
        assert s.routed_experts.dtype == torch.uint8
        assert s.routed_experts.shape == (len(s.tokens) - 1, 2, 2)
        mu, routes, _ = rescore(refs[0], s.tokens, len(s.prompt_tokens), 0.8)
        worst = max(worst, (s.rollout_log_probs - mu).abs().max().item())
        assert routes_equal(s.routed_experts, routes, sort_topk=False)
    assert worst < 1e-5


def test_greedy_reports_raw_log_probs_and_argmax_tokens(server, refs):
    samples = generate(server, PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=12))
    for s in samples:
        mu, _, logits = rescore(refs[0], s.tokens, len(s.prompt_tokens), 1.0)  # greedy: raw log_softmax
        assert torch.allclose(s.rollout_log_probs, mu, atol=1e-5)
        p = len(s.prompt_tokens)
        assert s.response_tokens == logits[p - 1:-1].argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_batch_independent(server):
    sampling = {"temperature": 1.0, "max_new_tokens": 16, "sampling_seed": 1234, "ignore_eos": True}

    async def go():
        async with client(server) as c:
            alone = await c.generate(PROMPTS[0], sampling)
            crowd = await asyncio.gather(*[c.generate(p, dict(sampling, sampling_seed=7 + i))
                                           for i, p in enumerate(PROMPTS)], c.generate(PROMPTS[0], sampling))
            return alone, crowd[-1]
    alone, batched = asyncio.run(go())
    assert alone.response_tokens == batched.response_tokens
    assert torch.allclose(alone.rollout_log_probs, batched.rollout_log_probs, atol=1e-6)
    other = generate(server, [PROMPTS[0]], SamplingConfig(max_new_tokens=16, sampling_seed=99, ignore_eos=True))[0]
    assert other.response_tokens != alone.response_tokens


def test_stop_token_and_length(server):
    first = generate(server, [PROMPTS[1]], SamplingConfig(temperature=0, max_new_tokens=1))[0].response_tokens[0]
    s = generate(server, [PROMPTS[1]], SamplingConfig(temperature=0, max_new_tokens=8, stop_token_ids=[first]))[0]
    assert s.response_tokens == [first] and s.status == SampleStatus.COMPLETED
    assert s.metadata["finish_reason"] == {"type": "stop", "matched": first}
    s = generate(server, [PROMPTS[1]], SamplingConfig(max_new_tokens=3, ignore_eos=True))[0]
    assert len(s.response_tokens) == 3 and s.status == SampleStatus.TRUNCATED


def test_input_log_probs_and_route_window(server, refs):
    prompt = PROMPTS[0]
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0.7, "max_new_tokens": 5, "sampling_seed": 3},
            "return_logprob": True, "logprob_start_len": 1, "return_routed_experts": True,
            "routed_experts_start_len": 2}
    out = httpx.post(f"{server.url}/generate", json=body, timeout=60, trust_env=False).json()
    tokens = prompt + out["output_ids"]
    _, routes, logits = rescore(refs[0], tokens, len(prompt), 1.0)
    raw = torch.log_softmax(logits, -1)
    inp = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in inp] == prompt[1:] and inp[0][0] is None  # SGLang: first returned entry is None
    expect = [raw[j - 1, prompt[j]].item() for j in range(2, len(prompt))]
    assert torch.allclose(torch.tensor([lp for lp, _, _ in inp[1:]]), torch.tensor(expect), atol=1e-5)

    async def go():  # the client stitches the known prefix routes with the returned window
        async with client(server) as c:
            return await c.generate(prompt, body["sampling_params"], routed_experts_start_len=2,
                                    prefix_routes=routes[:2].to(torch.uint8))
    s = asyncio.run(go())
    assert s.response_tokens == out["output_ids"] and routes_equal(s.routed_experts, routes, sort_topk=False)


@pytest.mark.parametrize("body, match", [
    ({"text": "hello"}, "needs a tokenizer"),
    ({"input_ids": [1, 2], "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty"),
    ({"input_ids": [1, 999]}, "token ids in \\[0, 256\\)"),
    ({"input_ids": [1] * 500, "sampling_params": {"max_new_tokens": 64}}, "context length 512"),
    ({"input_ids": [1], "stream": True}, "stream"),
    ({"input_ids": [1], "routed_experts_start_len": 3, "return_routed_experts": True}, "routed_experts_start_len"),
])
def test_bad_requests_are_rejected_with_the_field_named(server, body, match):
    async def go():
        async with client(server, r3=False, max_retries=0) as c:
            await c.request("POST", "/generate", json=body)
    with pytest.raises(EngineHTTPError, match=match):
        asyncio.run(go())


def test_control_endpoints(server):
    async def go():
        async with client(server, r3=False) as c:
            assert await c.health() and await c.health_generate()
            info = await c.model_info()
            await c.flush_cache()
            with pytest.raises(EngineHTTPError, match="backend 'nccl' is not supported.*use backend='gloo'"):
                await c.init_weights_update_group("127.0.0.1", 1234, 1, 2)  # SGLang's default backend: nccl
            return info, await c.server_info()
    info, sinfo = asyncio.run(go())
    assert info["model_type"] == "qwen3_moe" and info["num_experts"] == 8 and info["is_generation"]
    assert sinfo["enable_return_routed_experts"] and sinfo["internal_states"][0]["generated_tokens"] > 0
    # a batched body (list of prompts) answers with a list, like SGLang
    out = httpx.post(f"{server.url}/generate", json={"input_ids": PROMPTS, "sampling_params": {"max_new_tokens": 2}},
                     timeout=60, trust_env=False).json()
    assert isinstance(out, list) and [o["meta_info"]["prompt_tokens"] for o in out] == [6, 2, 3]


def test_pause_abort_and_continue(server):
    async def go():
        async with client(server) as c:
            await c.pause_generation("in_place")
            task = asyncio.create_task(c.generate(PROMPTS[0], {"max_new_tokens": 8}, rid="held"))
            await asyncio.sleep(0.3)
            assert not task.done()  # queued while paused
            await c.abort_request("held")
            held = await task
            await c.continue_generation()
            long = asyncio.create_task(c.generate(PROMPTS[1], {"max_new_tokens": 400, "ignore_eos": True}))
            while server.engine.generated_tokens == 0 or not server.engine.busy:
                await asyncio.sleep(0.005)
            await c.pause_generation("abort")  # aborts the running request, returns it partial
            partial = await long
            await c.continue_generation()
            after = await c.generate(PROMPTS[1], {"max_new_tokens": 2, "ignore_eos": True})
            return held, partial, after
    held, partial, after = asyncio.run(go())
    assert held.status == SampleStatus.ABORTED and held.response_tokens == []
    assert partial.status == SampleStatus.ABORTED and 0 < len(partial.response_tokens) < 400
    assert partial.routed_experts.shape[0] == len(partial.tokens) - 1  # partial data stays aligned
    assert after.status == SampleStatus.TRUNCATED


def test_weight_update_changes_outputs_and_bumps_version(server, ckpts, refs):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, sampling_seed=5, ignore_eos=True)

    async def go():
        async with client(server) as c:
            before = await c.generate(PROMPTS[0], sampling)
            res = await c.update_weights_from_disk(str(ckpts[1]), policy_version=1)
            v1 = await c.weight_version()
            c._seq = iter(range(10**6))  # same request index -> same seed as `before`
            new = await c.generate(PROMPTS[0], sampling)
            with pytest.raises(RolloutEngineError, match="no config.json"):
                await c.update_weights_from_disk("/does/not/exist", policy_version=9)
            await c.update_weights_from_disk(str(ckpts[0]), policy_version=2)
            c._seq = iter(range(10**6))
            back = await c.generate(PROMPTS[0], sampling)
            return before, res, v1, new, back, await c.weight_version()
    before, res, v1, new, back, v2 = asyncio.run(go())
    assert res["success"] and v1 == "1" and v2 == "2"
    assert new.policy_version == 1 and back.policy_version == 2 and before.policy_version == 0
    assert new.response_tokens != before.response_tokens
    mu_b, routes_b, _ = rescore(refs[1], new.tokens, len(PROMPTS[0]), 1.0)
    assert torch.allclose(new.rollout_log_probs, mu_b, atol=1e-5) and routes_equal(new.routed_experts, routes_b)
    assert back.response_tokens == before.response_tokens
    assert torch.allclose(back.rollout_log_probs, before.rollout_log_probs, atol=1e-6)


def test_in_place_pause_spans_weight_versions(ckpts):
    """Weights updated while paused in place: later tokens use the new weights, spans say where."""
    from megatron_vespo.rollout.embedded.engine import EmbeddedEngine
    from megatron_vespo.rollout.embedded.requests import render_response
    from megatron_vespo.rollout.protocol import response_to_sample

    engine = EmbeddedEngine.from_pretrained(str(ckpts[0]), weight_version="3").start()
    try:
        (req,), _ = engine.parse({"input_ids": PROMPTS[1], "return_logprob": True,
                                  "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}})
        engine.submit([req])
        while len(req.output_ids) < 2:
            time.sleep(0.001)
        engine.pause("in_place")
        ok, _, paused = engine.update_weights_from_disk(str(ckpts[1]), weight_version="4")
        switch = len(req.output_ids)
        engine.resume()
        assert req.done.wait(60) and ok and paused == 1
    finally:
        engine.shutdown()
    out = render_response(req, engine.weight_version, None)
    assert out["meta_info"]["weight_versions"] == [{"version": "3", "start": 0, "end": switch},
                                                   {"version": "4", "start": switch, "end": 400}]
    assert response_to_sample(out, PROMPTS[1]).policy_version == 3  # oldest policy that produced tokens


def test_process_mode_and_cli(tmp_path):
    from megatron_vespo.cli import main

    assert main(["tiny-checkpoint", str(tmp_path / "tiny"), "--seed", "3"]) == 0
    assert (tmp_path / "tiny" / "config.json").is_file() and (tmp_path / "tiny" / "model.safetensors").is_file()
    handle = start_embedded_server(str(tmp_path / "tiny"), mode="process", env={"OMP_NUM_THREADS": "1"})
    try:
        assert handle.pid is not None
        s = generate(handle, [PROMPTS[2]], SamplingConfig(max_new_tokens=4))[0]
        assert s.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED) and s.routed_experts is not None
    finally:
        handle.stop()
    assert not handle.process.alive()


def test_freeze_gc_endpoint_answers_as_sglang(server):
    """``/freeze_gc`` (SGLang's endpoint, GET or POST): the server freezes its heap (thread mode: this process)."""
    import gc

    async def go():
        async with SGLangClient(server.url) as c:
            await c.freeze_gc()
            async with httpx.AsyncClient() as h:
                return await h.get(server.url + "/freeze_gc")

    try:
        gc.unfreeze()
        resp = asyncio.run(go())
        assert resp.status_code == 200 and resp.text == "Garbage collection frozen.\n"
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
