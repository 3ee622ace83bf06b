"""The embedded engine refuses incomplete, unexpected, mis-shaped, non-finite and corrupt weights.

Each case is a real ``/update_weights_from_disk`` (or ``/update_weights_from_tensor``) call
against an embedded server on 127.0.0.1: the answer is a 400 naming the tensor or file, and
the server keeps serving the old weights (same greedy tokens and log-probs as before).
"""

import json
import shutil

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_vespo.rollout.embedded.models import save_tiny_checkpoint
from megatron_vespo.rollout.embedded.server import start_embedded_server

pytestmark = pytest.mark.e2e

Q = "model.layers.0.self_attn.q_proj.weight"
PROBE = {"input_ids": [5, 6, 7], "return_logprob": True,
         "sampling_params": {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    return save_tiny_checkpoint(root / "a", seed=0), save_tiny_checkpoint(root / "b", seed=1)


@pytest.fixture(scope="module")
def server(base):
    handle = start_embedded_server(str(base[0]), random_seed=0)
    yield handle
    handle.stop()


def probe(server):
    out = httpx.post(f"{server.url}/generate", json=PROBE, timeout=60, trust_env=False)
    assert out.status_code == 200, out.text
    meta = out.json()["meta_info"]
    return out.json()["output_ids"], [lp for lp, _, _ in meta["output_token_logprobs"]], meta["weight_version"]


def variant(base, tmp_path, edit):
    """A copy of checkpoint ``b`` with ``edit(tensors) -> tensors`` applied to its one safetensors file."""
    out = tmp_path / "ckpt"
    shutil.copytree(base[1], out)
    (f,) = out.glob("*.safetensors")
    tensors = edit(load_file(str(f)))
    if tensors is not None:
        save_file(tensors, str(f), metadata={"format": "pt"})
    return out, f


def nan_into(name):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[3] = float("nan")
        return t
    return edit


CASES = {
    "missing": (lambda t: {k: v for k, v in t.items() if k != Q}, ["missing", Q]),
    "unexpected": (lambda t: {**t, "model.layers.0.extra.weight": torch.zeros(2)},
                   ["unexpected", "model.layers.0.extra.weight"]),
    "misshaped": (lambda t: {**t, Q: t[Q][:-1].clone()}, ["shape mismatch", Q]),
    "nan": (nan_into(Q), ["NaN or inf", Q]),
    "inf_expert": (lambda t: {**t, "model.layers.1.mlp.experts.3.down_proj.weight":
                              torch.full_like(t["model.layers.1.mlp.experts.3.down_proj.weight"], float("inf"))},
                   ["NaN or inf", "experts.3.down_proj"]),
    "missing_expert": (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.experts.2.up_proj.weight"},
                       ["missing", "model.layers.1.mlp.experts.2.up_proj.weight"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_a_400_naming_it_and_old_weights_stay(server, base, tmp_path, case):
    edit, words = CASES[case]
    before = probe(server)
    path, _ = variant(base, tmp_path, edit)
    r = httpx.post(f"{server.url}/update_weights_from_disk", json={"model_path": str(path), "weight_version": "9"},
                   timeout=120, trust_env=False)
    assert r.status_code == 400, r.text
    assert not r.json()["success"] and all(w in r.json()["message"] for w in words), r.json()["message"]
    assert probe(server) == before  # same tokens, same log-probs, same version: nothing was loaded


@pytest.mark.parametrize("how", ["empty", "truncated", "bad_header", "garbage_index"])
def test_corrupt_files_are_400_not_500(server, base, tmp_path, how):
    before = probe(server)
    path, f = variant(base, tmp_path, lambda t: None)
    raw = f.read_bytes()
    if how == "empty":
        f.write_bytes(b"")
    elif how == "truncated":
        f.write_bytes(raw[: len(raw) // 2])
    elif how == "bad_header":
        f.write_bytes(raw[:8] + b"{not json" + raw[17:])
    else:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {Q: "nope.safetensors"}}))
    r = httpx.post(f"{server.url}/update_weights_from_disk", json={"model_path": str(path)}, timeout=120,
                   trust_env=False)
    assert r.status_code == 400, r.text
    assert ("nope.safetensors" if how == "garbage_index" else f.name) in r.json()["message"]
    assert probe(server) == before


def test_good_checkpoint_still_loads(server, base):
    r = httpx.post(f"{server.url}/update_weights_from_disk", json={"model_path": str(base[1]), "weight_version": "1"},
                   timeout=120, trust_env=False)
    assert r.status_code == 200 and r.json()["success"], r.text
    assert probe(server)[2] == "1"
    r = httpx.post(f"{server.url}/update_weights_from_disk", json={"model_path": str(base[0]), "weight_version": "0"},
                   timeout=120, trust_env=False)
    assert r.status_code == 200, r.text


def test_nan_tensor_update_is_refused(server):
    from megatron_vespo.weight_sync.tensor import serialize

    before = probe(server)
    bad = torch.zeros(server.engine.model.state_dict()[Q].shape)
    bad[0, 0] = float("nan")
    # sglang >= 0.5.21 (and the stand-in) takes tensor updates only inside a weight-update window
    assert httpx.post(f"{server.url}/begin_weight_update", json={}, trust_env=False).status_code == 200
    try:
        r = httpx.post(f"{server.url}/update_weights_from_tensor", timeout=60, trust_env=False,
                       json={"serialized_named_tensors": [serialize([(Q, bad)])]})
    finally:
        httpx.post(f"{server.url}/end_weight_update", json={}, trust_env=False)
    assert r.status_code == 400 and Q in r.json()["message"] and "NaN" in r.json()["message"], r.text
    assert probe(server) == before


def test_tied_lm_head_may_be_absent_from_a_full_checkpoint(tmp_path):
    """A tied ``lm_head`` is covered by the embedding (save_pretrained omits it): not 'missing'."""
    from megatron_vespo.rollout.embedded.models import build_tiny_model, reload_weights_in_place

    path = save_tiny_checkpoint(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    (f,) = path.glob("*.safetensors")
    assert "lm_head.weight" not in load_file(str(f))
    model = build_tiny_model(seed=0, tie_word_embeddings=True)
    assert reload_weights_in_place(model, path) > 0
    assert torch.equal(model.lm_head.weight, load_file(str(f))["model.embed_tokens.weight"])
