"""Route codec: SGLang's base64 int32 wire format <-> compact tensors, and every way it can be wrong."""

import base64

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_vespo.rollout.routes import (
    RouteDecodeError,
    RouteSpec,
    compact_dtype,
    decode_routes,
    encode_routes,
    routes_equal,
    stitch_routes,
)


def sglang_encode(t: torch.Tensor) -> str:
    """As sglang 0.5.23 detokenizer_manager._b64_encode_per_request (pybase64 == base64 output)."""
    return base64.b64encode(t.numpy().tobytes()).decode("utf-8")


def test_compact_dtype_boundaries():
    assert compact_dtype(8) == torch.uint8
    assert compact_dtype(256) == torch.uint8
    assert compact_dtype(257) == torch.int16
    assert compact_dtype(32768) == torch.int16
    assert compact_dtype(32769) == torch.int32
    with pytest.raises(ValueError):
        compact_dtype(0)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 40), layers=st.integers(1, 6), topk=st.integers(1, 4),
       experts=st.sampled_from([4, 8, 256, 300, 40000]), seed=st.integers(0, 2**16))
def test_sglang_payload_roundtrip(rows, layers, topk, experts, seed):
    topk = min(topk, experts)
    g = torch.Generator().manual_seed(seed)
    routes = torch.randint(0, experts, (rows, layers, topk), generator=g, dtype=torch.int32)
    spec = RouteSpec(num_layers=layers, topk=topk, num_experts=experts)
    payload = sglang_encode(routes)
    assert encode_routes(routes) == payload  # our server encodes byte-identically
    out = decode_routes(payload, num_tokens=rows + 1, spec=spec)
    assert out.dtype == compact_dtype(experts)
    assert out.shape == (rows, layers, topk)
    assert torch.equal(out.long(), routes.long())
    # SGLang's own reader (extract_routed_experts_from_meta_info) sees the same ints
    flat = np.frombuffer(base64.b64decode(payload.encode("utf-8")), dtype=np.int32)
    assert np.array_equal(flat, routes.numpy().reshape(-1))


def test_moe_layer_selection_drops_dense_rows():
    spec = RouteSpec.from_hf_config({"num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 2,
                                     "mlp_only_layers": [0]})
    assert spec.moe_layers == (1, 2)
    routes = torch.randint(0, 8, (5, 3, 2), dtype=torch.int32)
    routes[:, 0] = 0  # dense layer: SGLang never writes it
    out = decode_routes(sglang_encode(routes), num_tokens=6, spec=spec)
    assert torch.equal(out.long(), routes[:, 1:].long())


def test_start_len_window_and_old_server_fallback():
    spec = RouteSpec(num_layers=2, topk=2, num_experts=8)
    full = torch.randint(0, 8, (9, 2, 2), dtype=torch.int32)  # 10 tokens
    tail = decode_routes(sglang_encode(full[3:]), num_tokens=10, spec=spec, start_len=3)
    assert torch.equal(tail.long(), full[3:].long())
    # a server that ignores routed_experts_start_len returns every row: we slice it
    sliced = decode_routes(sglang_encode(full), num_tokens=10, spec=spec, start_len=3)
    assert torch.equal(sliced.long(), full[3:].long())
    stitched = stitch_routes(full[:3].to(torch.uint8), tail, 3)
    assert torch.equal(stitched.long(), full.long())
    with pytest.raises(RouteDecodeError, match="fewer than start_len"):
        stitch_routes(full[:2], tail, 3)


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p[:-4] + "!!!!", "not valid base64"),
    (lambda p: base64.b64encode(base64.b64decode(p)[:-4]).decode(), "not a multiple"),
    (lambda p: base64.b64encode(base64.b64decode(p) * 2).decode(), "token rows, expected"),
])
def test_corrupt_payloads_raise(mutate, match):
    spec = RouteSpec(num_layers=2, topk=2, num_experts=8)
    payload = sglang_encode(torch.randint(0, 8, (4, 2, 2), dtype=torch.int32))
    with pytest.raises(RouteDecodeError, match=match):
        decode_routes(mutate(payload), num_tokens=5, spec=spec)


def test_out_of_range_and_wrong_model_raise():
    spec = RouteSpec(num_layers=2, topk=2, num_experts=8)
    bad = torch.randint(0, 8, (4, 2, 2), dtype=torch.int32)
    bad[1, 1, 0] = 8
    with pytest.raises(RouteDecodeError, match="outside"):
        decode_routes(sglang_encode(bad), num_tokens=5, spec=spec)
    bad[1, 1, 0] = -1
    with pytest.raises(RouteDecodeError, match="outside"):
        decode_routes(sglang_encode(bad), num_tokens=5, spec=spec)
    # a payload of a 3-layer model read with a 2-layer spec: 4 rows x 3 layers = 6 rows x 2 layers
    other = torch.randint(0, 8, (4, 3, 2), dtype=torch.int32)
    with pytest.raises(RouteDecodeError, match="expected 4"):
        decode_routes(sglang_encode(other), num_tokens=5, spec=spec)
    with pytest.raises(RouteDecodeError, match="base64 string"):
        decode_routes([1, 2], num_tokens=5, spec=spec)


def test_route_spec_from_qwen3_30b_config_and_bytes():
    spec = RouteSpec.from_hf_config({"num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
                                     "decoder_sparse_step": 1, "mlp_only_layers": []})
    assert spec.bytes_per_token(compact=False) == 48 * 8 * 4
    assert spec.bytes_per_token(compact=True) == 48 * 8  # uint8: 4x smaller
    with pytest.raises(ValueError, match="not an MoE config"):
        RouteSpec.from_hf_config({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="exceeds"):
        RouteSpec(num_layers=2, topk=9, num_experts=8)


def test_route_spec_from_checkpoint_dir(tmp_path):
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2}')
    assert RouteSpec.from_hf_config(tmp_path) == RouteSpec(2, 2, 8)
    with pytest.raises(ValueError, match="no such config.json"):
        RouteSpec.from_hf_config(tmp_path / "missing")


def test_routes_equal_ignores_topk_order():
    a = torch.tensor([[[1, 2]]])
    assert routes_equal(a, torch.tensor([[[2, 1]]]))
    assert not routes_equal(a, torch.tensor([[[2, 1]]]), sort_topk=False)
    assert not routes_equal(a, torch.tensor([[[1, 3]]]))
    assert routes_equal(None, None) and not routes_equal(a, None)
