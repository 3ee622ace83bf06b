"""Running the embedded engine's HTTP server (uvicorn; the routes are in ``app.py``).

Start it with ``megatron-vespo serve --preset tiny --port 30000`` (or ``--model-path DIR``), or
``python -m megatron_vespo.rollout.embedded.server ...``, or from Python with
:func:`start_embedded_server` (uvicorn in a thread of this process, or a child process).

The endpoints (SGLang's, including the CPU in-memory weight paths of ``weight_update.py`` and
sglang 0.5.21-0.5.23's update windows) are listed in ``app.py``. Thread mode serves an engine of
this process; process mode starts this module with ``python -m`` in its own process group.
"""

import argparse
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from megatron_vespo.rollout.embedded.app import build_app
from megatron_vespo.rollout.embedded.engine import EmbeddedEngine
from megatron_vespo.rollout.embedded.guards import watch_parent
from megatron_vespo.rollout.process import ServerProcess, find_free_port
from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)


class EmbeddedServerHandle:
    """A running embedded server: ``url``, ``stop()``; ``engine`` in thread mode, ``pid`` in process mode."""

    def __init__(self, url: str, *, engine: Optional[EmbeddedEngine] = None, uvicorn_server: Any = None,
                 thread: Optional[threading.Thread] = None, process: Optional[ServerProcess] = None):
        self.url = url
        self.engine = engine
        self.process = process
        self._server, self._thread = uvicorn_server, thread

    @property
    def pid(self) -> Optional[int]:
        """Server process id (process mode), else None."""
        return None if self.process is None else self.process.pid

    def stop(self) -> None:
        """Stop the server (and its engine)."""
        if self.process is not None:
            self.process.stop()
        if self.engine is not None:  # first: aborts in-flight requests so their HTTP calls return
            self.engine.shutdown()
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = None

    def __enter__(self) -> "EmbeddedServerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _engine_args(model_path: Optional[str], preset: Optional[str], seed: int, dtype: str, random_seed: int,
                 max_batch_size: int, weight_version: str, batch_wait_ms: float = 20.0) -> list[str]:
    args = ["--model-path", model_path] if model_path else ["--preset", preset or "tiny", "--seed", str(seed)]
    return args + ["--dtype", dtype, "--random-seed", str(random_seed), "--max-batch-size", str(max_batch_size),
                   "--batch-wait-ms", str(batch_wait_ms), "--weight-version", weight_version]


def start_embedded_server(model_path: Optional[str] = None, *, preset: Optional[str] = None, seed: int = 0,
                          host: str = "127.0.0.1", port: Optional[int] = None, mode: str = "thread",
                          dtype: str = "float32", random_seed: int = 0, max_batch_size: int = 64,
                          weight_version: str = "default", engine: Optional[EmbeddedEngine] = None,
                          log_path: Optional[str] = None, env: Optional[dict] = None,
                          startup_timeout_s: float = 180.0, batch_wait_ms: float = 20.0) -> EmbeddedServerHandle:
    """Start an embedded server on ``host:port`` (a free port by default) and wait until healthy.

    ``mode="thread"`` runs uvicorn in a thread of this process (fast; ``handle.engine`` is the
    engine); ``mode="process"`` starts ``python -m megatron_vespo.rollout.embedded.server`` in its own
    process group (several servers use several cores; logs to ``log_path``).
    Give ``model_path`` (HF dir) or ``preset`` (random weights from ``seed``), or a ready ``engine``.
    ``max_batch_size`` / ``batch_wait_ms``: the engine's batching (``rollout.max_batch_size`` /
    ``rollout.batch_wait_ms`` in a job).
    """
    if mode == "process":
        if engine is not None:
            raise ValueError("engine= works in thread mode only")
        port = port or find_free_port(host)
        log = log_path or os.path.join(tempfile.mkdtemp(prefix="mv_embedded_"), f"server_{port}.log")
        cmd = [sys.executable, "-m", "megatron_vespo.rollout.embedded.server", "--host", host, "--port", str(port),
               "--parent-pid", str(os.getpid()),
               *_engine_args(model_path, preset, seed, dtype, random_seed, max_batch_size, weight_version,
                             batch_wait_ms)]
        proc = ServerProcess(cmd, f"http://{host}:{port}", log, env=env).start()
        proc.wait_healthy(startup_timeout_s, interval_s=0.2)
        return EmbeddedServerHandle(proc.url, process=proc)
    if mode != "thread":
        raise ValueError(f"mode must be 'thread' or 'process', got {mode!r}")
    uvicorn = require("uvicorn", "the embedded rollout server")
    if engine is None:
        kw = dict(random_seed=random_seed, max_batch_size=max_batch_size, weight_version=weight_version,
                  batch_wait_s=batch_wait_ms / 1000.0)
        engine = (EmbeddedEngine.from_pretrained(model_path, dtype, **kw) if model_path else
                  EmbeddedEngine.from_preset(preset or "tiny", seed, dtype, **kw))
    engine.start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # no Nagle: a socket made here has proto 0, so asyncio's transports skip their own TCP_NODELAY
    # (base_events._set_nodelay checks proto == IPPROTO_TCP), and a response's last partial segment
    # then waited for the client's delayed ACK: ~40 ms on back-to-back requests (issue 15). Accepted
    # connections inherit the option on Linux; uvicorn.run (process mode) binds through asyncio.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port or 0))  # binding port 0 here avoids the find-a-free-port race
    port = sock.getsockname()[1]
    app = build_app(engine, {"host": host, "port": port, "frontend": "embedded-thread"})
    # keep-alive longer than the client's pool expiry (3 s), so the client always closes first
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=30,
                                                timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"embedded-http-{port}",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            engine.shutdown()
            raise RuntimeError(f"embedded server on {host}:{port} failed to start")
        time.sleep(0.01)
    return EmbeddedServerHandle(f"http://{host}:{port}", engine=engine, uvicorn_server=server, thread=thread)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Arguments of ``megatron-vespo serve`` / ``python -m megatron_vespo.rollout.embedded.server``."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model-path", help="HF checkpoint directory (config.json + safetensors)")
    src.add_argument("--preset", help="random-weight model from models.presets (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="weight seed for --preset")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--random-seed", type=int, default=0, help="seed for requests without sampling_seed")
    p.add_argument("--max-batch-size", type=int, default=64, help="requests per forward batch")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long the first queued request waits for others to join its batch")
    p.add_argument("--weight-version", default="default")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="exit when this process (the run that started the server) is gone")


def _check_port_free(host: str, port: int) -> None:
    """Raise ValueError naming ``--port`` when ``host:port`` cannot be bound (in use, or not ours)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); "
                             "choose another --port") from None


def serve(args: argparse.Namespace) -> int:
    """Run the server in the foreground until interrupted."""
    uvicorn = require("uvicorn", "the embedded rollout server")
    if args.model_path and not Path(args.model_path, "config.json").is_file():
        raise ValueError(f"--model-path {args.model_path}: no config.json there")
    if getattr(args, "parent_pid", None):
        watch_parent(args.parent_pid)
    _check_port_free(args.host, args.port)  # before the model loads, and before announcing a URL
    kw = dict(random_seed=args.random_seed, max_batch_size=args.max_batch_size, weight_version=args.weight_version,
              batch_wait_s=args.batch_wait_ms / 1000.0)
    engine = (EmbeddedEngine.from_pretrained(args.model_path, args.dtype, **kw) if args.model_path
              else EmbeddedEngine.from_preset(args.preset or "tiny", args.seed, args.dtype, **kw))
    engine.start()
    app = build_app(engine, {"host": args.host, "port": args.port, "frontend": "embedded",
                             "model_path": engine.model_path})
    logger.info("embedded rollout server for %s on http://%s:%d", engine.model_path, args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="off", timeout_keep_alive=30)
    finally:
        engine.shutdown()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m megatron_vespo.rollout.embedded.server``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_serve_args(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
