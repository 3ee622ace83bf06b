"""SGLang weight-update windows (sglang 0.5.21-0.5.23 ``/begin_weight_update`` / ``/end_weight_update``).

The client opens a window only on servers that have one (``/server_info`` version, else a probe),
re-opens a window an interrupted sync left open, and the embedded engine refuses in-memory
updates outside a window with SGLang's message.
"""

import asyncio

import httpx
import pytest


def _client(version, calls, begin_status=200, begin_bodies=None):
    from megatron_vespo.rollout.client import SGLangClient

    bodies = list(begin_bodies or [])

    def handler(request):
        calls.append((request.url.path, request.content.decode() or None))
        if request.url.path == "/server_info":
            return httpx.Response(200, json={"tp_size": 1, **({"version": version} if version else {})})
        if request.url.path == "/begin_weight_update":
            if bodies:
                status, msg = bodies.pop(0)
                return httpx.Response(status, json={"success": status == 200, "message": msg})
            return httpx.Response(begin_status, json={"success": begin_status == 200, "message": "Success"})
        if request.url.path == "/end_weight_update":
            return httpx.Response(200, json={"success": True, "message": "Success"})
        return httpx.Response(404, json={"detail": "Not Found"})

    return SGLangClient("http://engine:30000", transport=httpx.MockTransport(handler), max_retries=0)


def _paths(calls):
    return [p for p, _ in calls]


def test_new_server_gets_begin_and_end():
    calls = []
    c = _client("0.5.23", calls)

    async def go():
        async with c.weight_update_window() as opened:
            assert opened
            calls.append(("<update>", None))
    asyncio.run(go())
    assert _paths(calls) == ["/server_info", "/begin_weight_update", "<update>", "/end_weight_update"]
    assert "\"selector\"" in calls[1][1]


def test_old_server_gets_no_window_and_is_asked_once():
    calls = []
    c = _client("0.5.20", calls)

    async def go():
        for _ in range(2):
            async with c.weight_update_window() as opened:
                assert not opened
    asyncio.run(go())
    assert _paths(calls) == ["/server_info"]


def test_unknown_version_is_probed_and_404_means_no_window():
    calls = []
    c = _client(None, calls, begin_status=404)
    assert asyncio.run(c.begin_weight_update()) is False
    assert asyncio.run(c.begin_weight_update()) is False
    assert _paths(calls) == ["/server_info", "/begin_weight_update"]


def test_window_left_open_is_closed_and_reopened():
    calls = []
    c = _client("0.5.21", calls, begin_bodies=[
        (400, "a weight-update session is already open; call end_weight_update() first")])
    assert asyncio.run(c.begin_weight_update()) is True
    assert _paths(calls) == ["/server_info", "/begin_weight_update", "/end_weight_update", "/begin_weight_update"]


def test_window_is_closed_after_an_error_inside():
    calls = []
    c = _client("0.5.23", calls)

    async def go():
        async with c.weight_update_window():
            raise RuntimeError("bucket refused")
    with pytest.raises(RuntimeError, match="bucket refused"):
        asyncio.run(go())
    assert _paths(calls)[-1] == "/end_weight_update"


def test_parse_version():
    from megatron_vespo.rollout.client import parse_version

    assert parse_version("0.5.23") == (0, 5, 23)
    assert parse_version("v0.5.21.post1") == (0, 5, 21)
    assert parse_version("0.5.23-embedded") == (0, 5, 23)
    assert parse_version(None) is None and parse_version("dev") is None


def test_embedded_window_follows_sglang_messages():
    from megatron_vespo.rollout.embedded.weight_update import WeightUpdateWindow

    w = WeightUpdateWindow()
    assert w.refusal("update_weights_from_tensor") == ("update_weights_from_tensor must run between "
                                                       "begin_weight_update() and end_weight_update()")
    assert w.end() == (False, "no weight-update session is open; call begin_weight_update() first")
    assert w.begin("bogus")[0] is False
    assert w.begin() == (True, "Success") and w.refusal("x") is None
    assert w.begin() == (False, "a weight-update session is already open; call end_weight_update() first")
    assert w.end() == (True, "Success") and not w.is_open
    ok, msg = w.begin(generating=True)  # a batch decoding unpaused would run on weights in a loading layout
    assert not ok and "pause_generation() before begin_weight_update()" in msg and not w.is_open
