"""Client-side conversion of SGLang responses built exactly as SGLang's code builds them.

Reference: sglang 0.5.23 (PyPI wheel ``sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64``):
``managers/tokenizer_manager.py::_handle_batch_output`` (meta_info keys, routed_experts as
``pybase64.b64encode(val.numpy().tobytes()).decode("utf-8")``), ``detokenize_logprob_tokens``
(``(logprob, token_id, None)`` tuples when ``return_text_in_logprobs`` is off),
``managers/schedule_batch.py`` ``FINISH_MATCHED_TOKEN / FINISH_LENGTH / FINISH_ABORT.to_json``,
``utils/weight_versions.py::add_weight_versions_to_meta_info``, and
``state_capturer/base.py::get_topk`` (int32 rows ``[start_len, seqlen - 1)``). The HTTP layer
serialises with orjson, which writes NaN as ``null``: both forms are tested.
"""

import base64
import json
import math

import pytest
import torch

from megatron_vespo.rollout.config import SamplingConfig
from megatron_vespo.rollout.protocol import build_generate_payload, parse_weight_version, response_to_sample
from megatron_vespo.rollout.routes import RouteSpec
from megatron_vespo.types import SampleStatus

SPEC = RouteSpec(num_layers=2, topk=2, num_experts=8)

# GenerateReqInput fields of sglang 0.5.23 that our payloads use (managers/io_struct.py)
SGLANG_GENERATE_FIELDS = {"rid", "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                          "top_logprobs_num", "return_routed_experts", "routed_experts_start_len", "stream"}
# SamplingParams fields of sglang 0.5.23 (sampling/sampling_params.py)
SGLANG_SAMPLING_FIELDS = {"max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
                          "ignore_eos", "sampling_seed", "n", "no_stop_trim", "skip_special_tokens"}


def finish_stop(tok):  # FINISH_MATCHED_TOKEN(matched=tok).to_json()
    return {"type": "stop", "matched": tok}


def finish_length(n):  # FINISH_LENGTH(length=n).to_json()
    return {"type": "length", "length": n}


def finish_abort(msg="Aborted"):  # FINISH_ABORT(message).to_json()
    return {"type": "abort", "message": msg, "status_code": None, "err_type": None}


def sglang_response(prompt, output_ids, logprobs, *, finish, routes=None, weight_version="default",
                    spans=None, num_retractions=0, with_text=True):
    """One /generate answer as tokenizer_manager._handle_batch_output assembles it."""
    meta_info = {"id": "rid-0", "finish_reason": finish, "prompt_tokens": len(prompt),
                 "weight_version": weight_version, "num_retractions": num_retractions}
    # convert_logprob_style -> add_logprob_to_meta_info (logprob_start_len=-1: no input logprobs)
    meta_info["input_token_logprobs"] = []
    meta_info["output_token_logprobs"] = [(lp, tok, None) for lp, tok in zip(logprobs, output_ids)]
    meta_info["output_token_logprobs_length"] = len(output_ids)
    meta_info.update({"reasoning_tokens": 0, "completion_tokens": len(output_ids), "cached_tokens": 0})
    if spans is not None:  # add_weight_versions_to_meta_info
        meta_info["weight_versions"] = [{"version": v, "start": s, "end": e} for v, s, e in spans]
        meta_info["weight_version"] = spans[-1][0]
    if routes is not None:
        meta_info["routed_experts"] = base64.b64encode(routes.numpy().tobytes()).decode("utf-8")
    out = {"text": "decoded"} if with_text else {}  # skip_tokenizer_init: BatchTokenIDOutput has no text
    out.update({"output_ids": list(output_ids), "meta_info": meta_info})
    return out


def over_http(resp):
    """What the client sees after SGLang's orjson response (tuples -> lists, NaN -> null)."""
    return json.loads(json.dumps(resp).replace("NaN", "null"))


def make_case(prompt_len=4, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (prompt_len,), generator=g).tolist()
    out = torch.randint(0, 256, (t,), generator=g).tolist()
    lps = (-torch.rand(t, generator=g) * 5).tolist()
    routes = torch.randint(0, 8, (prompt_len + t - 1, 2, 2), generator=g, dtype=torch.int32)
    return prompt, out, lps, routes


@pytest.mark.parametrize("wire", [False, True])
def test_good_response_becomes_trainable_sample(wire):
    prompt, out, lps, routes = make_case()
    resp = sglang_response(prompt, out, lps, finish=finish_stop(out[-1]), routes=routes, weight_version="3")
    s = response_to_sample(over_http(resp) if wire else resp, prompt, route_spec=SPEC, expect_routes=True,
                           group_index=7)
    assert s.status == SampleStatus.COMPLETED
    assert s.prompt_tokens == prompt and s.response_tokens == out
    assert s.rollout_log_probs.dtype == torch.float32
    assert torch.allclose(s.rollout_log_probs, torch.tensor(lps))
    assert s.routed_experts.dtype == torch.uint8 and torch.equal(s.routed_experts.long(), routes.long())
    assert s.policy_version == 3 and s.group_index == 7
    assert s.metadata["text"] == "decoded" and "flag_reasons" not in s.metadata


@pytest.mark.parametrize("finish, status", [(finish_length(5), SampleStatus.TRUNCATED),
                                            (finish_abort(), SampleStatus.ABORTED),
                                            (None, SampleStatus.ABORTED)])
def test_finish_reason_maps_to_status(finish, status):
    prompt, out, lps, _ = make_case()
    s = response_to_sample(sglang_response(prompt, out, lps, finish=finish, with_text=False), prompt)
    assert s.status == status and "text" not in s.metadata


@pytest.mark.parametrize("wire", [False, True])
def test_nan_log_prob_is_flagged(wire):
    prompt, out, lps, routes = make_case()
    lps[2] = math.nan
    resp = sglang_response(prompt, out, lps, finish=finish_length(5), routes=routes)
    s = response_to_sample(over_http(resp) if wire else resp, prompt, route_spec=SPEC, expect_routes=True)
    assert s.status == SampleStatus.FLAGGED
    assert s.rollout_log_probs is None
    assert "output_token_logprobs[2]" in s.metadata["flag_reasons"][0]


def test_positive_log_prob_and_token_mismatch_are_flagged():
    prompt, out, lps, _ = make_case()
    bad = list(lps)
    bad[0] = 0.5
    assert response_to_sample(sglang_response(prompt, out, bad, finish=finish_length(5)), prompt).status \
        == SampleStatus.FLAGGED
    resp = sglang_response(prompt, out, lps, finish=finish_length(5))
    resp["meta_info"]["output_token_logprobs"][1] = (lps[1], out[1] + 1, None)
    s = response_to_sample(resp, prompt)
    assert s.status == SampleStatus.FLAGGED and "is for token" in s.metadata["flag_reasons"][0]
    resp = sglang_response(prompt, out, lps[:-1] + [], finish=finish_length(5))
    resp["meta_info"]["output_token_logprobs"] = resp["meta_info"]["output_token_logprobs"][:-1]
    assert "output_token_logprobs for" in response_to_sample(resp, prompt).metadata["flag_reasons"][0]


def test_missing_routes_with_r3_is_flagged():
    prompt, out, lps, _ = make_case()
    s = response_to_sample(sglang_response(prompt, out, lps, finish=finish_length(5)), prompt, route_spec=SPEC,
                           expect_routes=True)
    assert s.status == SampleStatus.FLAGGED and s.routed_experts is None
    assert "--enable-return-routed-experts" in s.metadata["flag_reasons"][0]


@pytest.mark.parametrize("rows_delta", [-1, +1, +3])
def test_misaligned_routes_are_flagged_never_returned(rows_delta):
    prompt, out, lps, routes = make_case()
    n = routes.shape[0] + rows_delta
    wrong = torch.randint(0, 8, (n, 2, 2), dtype=torch.int32)
    s = response_to_sample(sglang_response(prompt, out, lps, finish=finish_length(5), routes=wrong), prompt,
                           route_spec=SPEC, expect_routes=True)
    assert s.status == SampleStatus.FLAGGED and s.routed_experts is None
    assert "token rows" in s.metadata["flag_reasons"][0]
    assert s.rollout_log_probs is not None  # log-probs themselves were fine


def test_wrong_layer_count_and_expert_range_are_flagged():
    prompt, out, lps, routes = make_case()
    three_layers = torch.randint(0, 8, (routes.shape[0], 3, 2), dtype=torch.int32)
    s = response_to_sample(sglang_response(prompt, out, lps, finish=finish_length(5), routes=three_layers), prompt,
                           route_spec=SPEC, expect_routes=True)
    assert s.status == SampleStatus.FLAGGED
    routes[0, 0, 0] = 9
    s = response_to_sample(sglang_response(prompt, out, lps, finish=finish_length(5), routes=routes), prompt,
                           route_spec=SPEC, expect_routes=True)
    assert s.status == SampleStatus.FLAGGED and "outside" in s.metadata["flag_reasons"][0]


def test_retracted_request_is_flagged_under_r3_only():
    prompt, out, lps, routes = make_case()
    resp = sglang_response(prompt, out, lps, finish=finish_length(5), routes=routes, num_retractions=1)
    s = response_to_sample(resp, prompt, route_spec=SPEC, expect_routes=True)
    assert s.status == SampleStatus.FLAGGED and "miles#3277" in s.metadata["flag_reasons"][0]
    assert response_to_sample(resp, prompt, route_spec=SPEC, expect_routes=True, flag_retracted=False).status \
        == SampleStatus.TRUNCATED
    assert response_to_sample(resp, prompt).status == SampleStatus.TRUNCATED  # R3 off: routes irrelevant


def test_weight_version_spans_tag_the_oldest_policy():
    prompt, out, lps, _ = make_case()
    resp = sglang_response(prompt, out, lps, finish=finish_length(5), spans=[("4", 0, 2), ("5", 2, 5)])
    s = response_to_sample(resp, prompt)
    assert s.policy_version == 4 and s.metadata["weight_version"] == "5"
    assert len(s.metadata["weight_versions"]) == 2
    resp = sglang_response(prompt, out, lps, finish=finish_length(5), weight_version="default")
    assert response_to_sample(resp, prompt, default_policy_version=9).policy_version == 9
    assert parse_weight_version("12") == 12 and parse_weight_version("default") is None


def test_continued_request_stitches_prefix_routes():
    prompt, out, lps, routes = make_case(prompt_len=6)
    start = 4
    resp = sglang_response(prompt, out, lps, finish=finish_length(5), routes=routes[start:])
    s = response_to_sample(resp, prompt, route_spec=SPEC, expect_routes=True, routed_experts_start_len=start,
                           prefix_routes=routes[:start].to(torch.uint8))
    assert s.status == SampleStatus.COMPLETED or s.status == SampleStatus.TRUNCATED
    assert torch.equal(s.routed_experts.long(), routes.long())
    s = response_to_sample(resp, prompt, route_spec=SPEC, expect_routes=True, routed_experts_start_len=start)
    assert s.status == SampleStatus.FLAGGED and "prefix routes" in s.metadata["flag_reasons"][0]


def test_prompt_count_mismatch_flagged_and_garbage_rejected():
    prompt, out, lps, _ = make_case()
    resp = sglang_response(prompt, out, lps, finish=finish_length(5))
    assert response_to_sample(resp, prompt[:-1]).status == SampleStatus.FLAGGED
    with pytest.raises(ValueError, match="not an SGLang /generate response"):
        response_to_sample({"error": {"message": "boom"}}, prompt)
    with pytest.raises(ValueError, match="route_spec"):
        response_to_sample(resp, prompt, expect_routes=True)


def test_generate_payload_uses_sglang_field_names():
    sp = SamplingConfig(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, stop_token_ids=[2],
                        sampling_seed=5).to_sglang(seed=6)
    assert set(sp) <= SGLANG_SAMPLING_FIELDS and sp["sampling_seed"] == 6
    p = build_generate_payload([1, 2, 3], sp, rid="x", return_routed_experts=True, routed_experts_start_len=2)
    assert set(p) <= SGLANG_GENERATE_FIELDS
    assert p["logprob_start_len"] == -1 and p["return_logprob"] is True and p["routed_experts_start_len"] == 2
    assert "routed_experts_start_len" not in build_generate_payload([1], sp)
    with pytest.raises(ValueError, match="routed_experts_start_len"):
        build_generate_payload([1, 2], sp, routed_experts_start_len=3)
    with pytest.raises(ValueError, match="empty"):
        build_generate_payload([], sp)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=0)
