"""Embedded engine internals: SGLang's sampling / log-prob conventions, router capture, no HTTP."""

import pytest
import torch

from megatron_vespo.rollout.embedded.capture import RouterCapture
from megatron_vespo.rollout.embedded.engine import EmbeddedEngine
from megatron_vespo.rollout.embedded.models import build_tiny_model
from megatron_vespo.rollout.embedded.requests import render_response
from megatron_vespo.rollout.embedded.sampling import RowParams, reported_log_probs, sample_tokens, truncated_probs
from megatron_vespo.rollout.protocol import response_to_sample
from megatron_vespo.rollout.routes import RouteSpec, routes_equal


def brute_force_filter(probs, top_k, top_p):
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep, mass = set(), 0.0
    for rank, i in enumerate(order):
        if rank >= top_k or (rank > 0 and mass >= top_p):
            break
        keep.add(i)
        mass += probs[i]
    out = torch.tensor([p if i in keep else 0.0 for i, p in enumerate(probs)])
    return out / out.sum()


@pytest.mark.parametrize("top_k, top_p", [(-1, 1.0), (3, 1.0), (-1, 0.5), (4, 0.7), (1, 0.9)])
def test_truncation_matches_brute_force(top_k, top_p):
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(top_k + 10))
    rows = [RowParams.normalise(0.7, top_p, top_k)] * 3
    got = truncated_probs(logits, rows)
    for b in range(3):
        probs = torch.softmax(logits[b] / 0.7, -1).tolist()
        want = brute_force_filter(probs, 12 if top_k < 0 else top_k, top_p)
        assert torch.allclose(got[b], want, atol=1e-6)


def test_reported_log_probs_follow_sglang_convention():
    logits = torch.randn(2, 10)
    warm, greedy = RowParams.normalise(0.5, 0.8, 3), RowParams.normalise(0.0, 1.0, -1)
    assert greedy.greedy and greedy.temperature == 1.0 and greedy.top_k == 1
    lp = reported_log_probs(logits, [warm, greedy], original=False)
    # temperature-scaled, *not* renormalised after top-k/top-p; greedy rows raw
    assert torch.allclose(lp[0], torch.log_softmax(logits[0] / 0.5, -1))
    assert torch.allclose(lp[1], torch.log_softmax(logits[1], -1))
    raw = reported_log_probs(logits, [warm, greedy], original=True)  # SGLANG_RETURN_ORIGINAL_LOGPROB=1
    assert torch.allclose(raw, torch.log_softmax(logits, -1))


def test_sampler_draws_from_the_truncated_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    row = RowParams.normalise(1.0, 0.9, -1)  # keeps the first three tokens
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample_tokens(logits.clone(), [row], [g])[0]] += 1
    freq = counts / counts.sum()
    assert counts[3] == 0
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.03)
    greedy = sample_tokens(logits, [RowParams.normalise(0.0, 1.0, -1)], [g])
    assert greedy.tolist() == [0]


def _run(engine, body):
    reqs, _ = engine.parse(body)
    engine.run_batch(reqs)
    return [render_response(r, engine.weight_version, None) for r in reqs]


def test_original_logprob_switch_reports_raw_log_probs(monkeypatch):
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    model = build_tiny_model(seed=0)
    engine = EmbeddedEngine(model)
    assert engine.original_logprob
    (out,) = _run(engine, {"input_ids": [3, 4, 5], "return_logprob": True,
                           "sampling_params": {"temperature": 0.6, "max_new_tokens": 6, "sampling_seed": 1}})
    tokens = [3, 4, 5] + out["output_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    want = torch.log_softmax(logits[2:-1], -1).gather(-1, torch.tensor(out["output_ids"])[:, None])[:, 0]
    got = torch.tensor([lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]])
    assert torch.allclose(got, want, atol=1e-5)


def test_dense_layers_get_zero_routes_and_are_dropped_by_the_client():
    model = build_tiny_model("tiny-dense-first", seed=0)
    cap = RouterCapture(model)
    assert cap.spec.moe_layers == (1,) and cap.spec.num_layers == 2
    engine = EmbeddedEngine(model)
    prompt = [7, 8, 9, 10]
    (out,) = _run(engine, {"input_ids": prompt, "return_logprob": True, "return_routed_experts": True,
                           "sampling_params": {"max_new_tokens": 5, "sampling_seed": 2, "ignore_eos": True}})
    spec = RouteSpec.from_hf_config(engine.model_info())
    assert spec == cap.spec
    s = response_to_sample(out, prompt, route_spec=spec, expect_routes=True)
    assert s.routed_experts.shape == (len(s.tokens) - 1, 1, 2)
    cap.start()
    with torch.no_grad():
        model(input_ids=torch.tensor([s.tokens]))
    full = cap.collect(1, len(s.tokens))[0, :-1]
    assert torch.all(full[:, 0] == 0)  # dense layer
    assert routes_equal(s.routed_experts, full[:, 1:], sort_topk=False)


def test_capture_rejects_dense_models_and_engine_refuses_r3_then():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dense = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="no MoE router"):
        RouterCapture(dense)
    engine = EmbeddedEngine(dense)
    with pytest.raises(ValueError, match="no MoE router"):
        engine.parse({"input_ids": [1], "return_routed_experts": True})
    (out,) = _run(engine, {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    assert "routed_experts" not in out["meta_info"] and len(out["output_ids"]) >= 1
