"""``megatron-vespo serve`` on a port already in use: one error naming --port, before any model loads."""

import socket

from megatron_vespo.cli import main


def test_port_in_use_is_named_before_the_model_loads(monkeypatch, caplog):
    import megatron_vespo.rollout.embedded.server as server

    def no_load(*a, **k):
        raise AssertionError("model loaded before the port check")

    monkeypatch.setattr(server.EmbeddedEngine, "from_preset", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--preset", "tiny", "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in caplog.text
    assert "choose another --port" in caplog.text
