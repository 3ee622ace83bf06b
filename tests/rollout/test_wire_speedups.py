"""The rollout wire's fast paths (issue 15) give the same answers as the slow ones they replace:
orjson vs ``json`` (utils/fastjson.py), a batch decode vs one ``decode`` per row, and a request's
``done`` Event made only when someone waits on it."""

import json
import math
import sys
import threading
from pathlib import Path

import pytest

from megatron_vespo.utils import fastjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

ANSWER = [{"text": "12", "output_ids": [4, 5], "meta_info": {
    "id": "a-0", "finish_reason": {"type": "length", "length": 2}, "weight_version": "3",
    "output_token_logprobs": [[-0.125, 4, None], [-3.4028234663852886e38, 5, None]],
    "e2e_latency": 0.0123456789, "cached_tokens": 0, "note": "ünïcode ✓"}}]


@pytest.fixture(params=["orjson", "stdlib"])
def flavour(request, monkeypatch):
    if request.param == "orjson":
        if not fastjson.HAVE_ORJSON:
            pytest.skip("orjson not installed (pip install orjson; it is in the [serve] and [cpu] extras)")
    else:
        monkeypatch.setattr(fastjson, "orjson", None)
    return request.param


def test_round_trip_equals_the_standard_library(flavour):
    raw = fastjson.dumps(ANSWER)
    assert isinstance(raw, bytes)
    assert fastjson.loads(raw) == json.loads(raw) == ANSWER  # floats survive bit-exactly
    assert fastjson.loads(raw.decode()) == ANSWER  # str input too


def test_non_finite_floats_are_written_as_null_as_sglang_does(flavour):
    got = fastjson.loads(fastjson.dumps({"lp": [float("nan"), float("-inf"), -1.5], "x": {"y": float("inf")}}))
    assert got == {"lp": [None, None, -1.5], "x": {"y": None}}


def test_loads_takes_nan_tokens_and_rejects_what_is_not_json(flavour):
    got = fastjson.loads(b'{"a": NaN, "b": -Infinity}')
    assert math.isnan(got["a"]) and got["b"] == float("-inf")
    for bad in (b"{not json", b"[1, 2", b"\xff\xfe"):
        with pytest.raises(ValueError):
            fastjson.loads(bad)


def test_what_orjson_refuses_falls_back_to_json():
    assert json.loads(fastjson.dumps({1: 2, "big": 2**70})) == {"1": 2, "big": 2**70}


def test_decode_batch_equals_decode_per_row():
    pytest.importorskip("transformers")
    import addition_task

    from megatron_vespo.rollout.embedded.engine import EmbeddedEngine

    engine = EmbeddedEngine.from_preset("tiny", seed=0)
    rows = [[3, 4, 5, 2], [], [1, 13, 14, 0, 0], [12, 11, 10, 9, 8, 7, 6, 5, 4, 3]]
    for cleanup in (False, True):  # True: the per-row path
        tok = addition_task.char_tokenizer()
        tok.clean_up_tokenization_spaces = cleanup
        engine.tokenizer = tok
        assert engine.decode_batch(rows) == [engine.decode(r) for r in rows] == \
            [tok.decode(r, skip_special_tokens=True) for r in rows]
    assert engine.decode_batch(rows)[0] == "012"  # <eos> (id 2) skipped; ids 3.. are "0"...


def test_done_event_is_made_lazily_and_never_misses_a_finish():
    from megatron_vespo.rollout.embedded.requests import parse_generate

    body = {"input_ids": [[1, 2], [3]], "sampling_params": {"max_new_tokens": 2}}
    (a, b), batched = parse_generate(body, vocab_size=16, max_len=32, tokenize=None)
    assert batched and a._event is None and b._event is None  # nothing made while parsing
    seen = []
    a.on_done = seen.append
    a.finish({"type": "length", "length": 2})  # finished before anyone asked for the event
    assert a.is_done and a._event is None and seen == [a]
    assert a.done.is_set() and a.done is a.done  # made on demand, already set, one Event
    waiter = threading.Thread(target=lambda: seen.append(b.done.wait(30)))
    waiter.start()  # waits before the finish
    b.finish({"type": "stop", "matched": 3})
    waiter.join(30)
    assert seen[-1] is True and b.is_done
