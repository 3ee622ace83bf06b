"""HTTP front of the embedded engine: SGLang's endpoints and JSON shapes (FastAPI + uvicorn).

Start it with ``megatron-vespo serve --preset tiny --port 30000`` (or ``--model-path DIR``), or
``python -m megatron_vespo.rollout.embedded.server ...``, or from Python with
:func:`start_embedded_server` (uvicorn in a thread of this process, or a child process).

Implemented like SGLang: ``/generate``, ``/health``, ``/health_generate``, ``/model_info``
(+ ``/get_model_info``), ``/server_info`` (+ ``/get_server_info``), ``/flush_cache`` (no prefix
cache here: always succeeds), ``/update_weights_from_disk``, ``/update_weight_version``,
``/pause_generation``, ``/continue_generation``, ``/abort_request``, and the in-memory weight
paths on CPU: ``/init_weights_update_group`` (gloo only; nccl answers 400),
``/update_weights_from_distributed``, ``/destroy_weights_update_group`` and
``/update_weights_from_tensor`` (CPU shared-memory tensors from a process on this machine);
see ``weight_update.py``. As in sglang 0.5.21-0.5.23, the last two are refused unless a window
was opened with ``/begin_weight_update`` (closed with ``/end_weight_update``).
"""

import argparse
import asyncio
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from megatron_vespo.rollout.embedded.engine import EmbeddedEngine
from megatron_vespo.rollout.embedded.guards import abort_on_disconnect, watch_parent
from megatron_vespo.rollout.embedded.requests import render_response
from megatron_vespo.rollout.embedded.schema import (
    AbortIn,
    BeginWeightUpdateIn,
    DestroyGroupIn,
    InitGroupIn,
    PauseIn,
    RequestError,
    UpdateFromDiskIn,
    UpdateFromDistributedIn,
    UpdateFromTensorIn,
    UpdateWeightVersionIn,
    parse_body,
    validate,
)
from megatron_vespo.rollout.embedded.weight_update import WeightUpdateWindow, deserialize_named_tensors
from megatron_vespo.rollout.process import ServerProcess, find_free_port
from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)

# The SGLang server API this engine follows (its /server_info "version"; clients pick features by it).
EMULATED_SGLANG_VERSION = "0.5.23-embedded"

def build_app(engine: EmbeddedEngine, server_info: Optional[dict] = None) -> Any:
    """The FastAPI app serving ``engine``."""
    fastapi = require("fastapi", "the embedded rollout server")
    from fastapi import Body, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    app = fastapi.FastAPI(title="megatron_vespo embedded rollout server")
    info = dict(server_info or {})

    def error(msg: str, status: int = 400) -> Any:
        return JSONResponse({"error": {"message": msg}}, status_code=status)

    async def body_of(request: Any) -> Any:
        return parse_body(await request.body())  # RequestError (-> 400) when not JSON

    async def body_as(request: Any, model: Any) -> Any:
        return validate(model, await body_of(request))  # RequestError (-> 400) names the field

    async def run(reqs: list, request: Any = None, complete: bool = False) -> list:
        loop = asyncio.get_running_loop()
        # one wake-up of this event loop when the LAST request finishes (not one per request: each
        # call_soon_threadsafe took the interpreter lock from the engine thread mid-batch)
        fut, left, lock = loop.create_future(), [len(reqs)], threading.Lock()

        def one_done(req: Any) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        for r in reqs:
            r.on_done = one_done
        engine.submit(reqs, complete=complete)
        watch = asyncio.ensure_future(abort_on_disconnect(engine, request, reqs)) if request is not None else None
        try:
            await fut
            return list(reqs)
        except asyncio.CancelledError:  # client went away: free the batch slots
            for r in reqs:
                engine.abort(r.rid, message="client disconnected")
            raise
        finally:
            if watch is not None:
                watch.cancel()

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        try:
            reqs, batched = engine.parse(await body_of(request))
        except (ValueError, TypeError) as exc:
            return error(str(exc))
        done = await run(reqs, request, complete=batched)  # a batch body is a whole batch: no batching wait
        decode = engine.decode if engine.tokenizer is not None else None
        outs = [render_response(r, engine.weight_version, decode) for r in done]
        return JSONResponse(outs if batched else outs[0])

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        if engine.busy or engine.paused:  # as SGLang: a running server is a healthy one
            return Response(status_code=200)
        reqs, _ = engine.parse({"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}})
        try:
            await asyncio.wait_for(run(reqs), timeout=20.0)
        except asyncio.TimeoutError:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/ready")
    async def ready():
        return Response(status_code=200)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return engine.model_info()

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return {**info, "weight_version": engine.weight_version, "random_seed": engine.random_seed,
                "max_batch_size": engine.max_batch_size, "tp_size": 1,
                "version": EMULATED_SGLANG_VERSION,
                "enable_return_routed_experts": engine.capture is not None,
                "internal_states": [{"generated_tokens": engine.generated_tokens, "paused": engine.paused,
                                     "busy": engine.busy}]}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return PlainTextResponse("Cache flushed.\n(The embedded engine keeps no prefix cache.)\n")

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError):
        return error(str(exc))

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def unparsable_body(request: Request, exc: Any):  # e.g. malformed JSON: 400, as our own checks
        errs = exc.errors()
        where = ".".join(str(p) for p in errs[0].get("loc", ())) if errs else "body"
        return error(f"request body invalid at {where}: {errs[0].get('msg') if errs else exc}")

    @app.post("/update_weights_from_disk")
    def update_weights_from_disk(body: Any = Body(None)):  # sync: FastAPI runs it in a thread
        try:
            b = validate(UpdateFromDiskIn, body)
        except RequestError as exc:
            return JSONResponse({"success": False, "message": str(exc), "num_paused_requests": 0}, status_code=400)
        if b.load_format not in (None, "auto", "safetensors"):
            return JSONResponse({"success": False, "num_paused_requests": 0,
                                 "message": f"load_format {b.load_format!r} not supported (auto, safetensors)"},
                                status_code=400)
        ok, msg, paused = engine.update_weights_from_disk(b.model_path, weight_version=b.weight_version,
                                                          abort_all_requests=b.abort_all_requests)
        return JSONResponse({"success": ok, "message": msg, "num_paused_requests": paused},
                            status_code=200 if ok else 400)

    @app.post("/update_weight_version")
    def update_weight_version(body: Any = Body(None)):
        b = validate(UpdateWeightVersionIn, body)
        if b.abort_all_requests:
            engine.abort(abort_all=True, message="Abort by update_weight_version")
        engine.update_weight_version(b.new_version)
        return {"success": True, "message": f"Weight version updated to {b.new_version}",
                "new_version": b.new_version}

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await body_as(request, AbortIn)
        engine.abort(body.rid, abort_all=body.abort_all)
        return Response(status_code=200)

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        engine.pause((await body_as(request, PauseIn)).mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def continue_generation():
        engine.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def answer(ok: bool, msg: str) -> Any:
        return JSONResponse({"success": ok, "message": msg}, status_code=200 if ok else 400)

    # sglang 0.5.21-0.5.23's begin/end_weight_update session, kept on the engine (tests read it)
    window = engine.weight_window = getattr(engine, "weight_window", None) or WeightUpdateWindow()

    @app.post("/begin_weight_update")
    async def begin_weight_update(request: Request):
        raw = await body_of(request)
        return answer(*window.begin(validate(BeginWeightUpdateIn, {} if raw is None else raw).selector))

    @app.post("/end_weight_update")
    async def end_weight_update():
        return answer(*window.end())

    @app.post("/init_weights_update_group")
    def init_weights_update_group(body: Any = Body(None)):  # sync: blocks until the group formed
        b = validate(InitGroupIn, body)
        return answer(*engine.weight_groups.init(b.master_address, b.master_port, b.rank_offset, b.world_size,
                                                 b.group_name, b.backend))

    @app.post("/destroy_weights_update_group")
    def destroy_weights_update_group(body: Any = Body(None)):
        return answer(*engine.weight_groups.destroy(validate(DestroyGroupIn, {} if body is None else body).group_name))

    @app.post("/update_weights_from_distributed")
    def update_weights_from_distributed(body: Any = Body(None)):
        b = validate(UpdateFromDistributedIn, body)
        if (refused := window.refusal("update_weights_from_distributed")) is not None:
            return answer(False, refused)  # like SGLang: before receiving, so the broadcast stays pending
        try:  # receive first, whatever the names: the trainer's broadcast must be consumed
            named = engine.weight_groups.receive(b.group_name, b.names, b.dtypes, b.shapes, b.load_format)
        except ValueError as exc:
            return answer(False, str(exc))
        return answer(*engine.load_weights(named, b.weight_version, b.abort_all_requests))

    @app.post("/update_weights_from_tensor")
    def update_weights_from_tensor(body: Any = Body(None)):
        b = validate(UpdateFromTensorIn, body)
        if (refused := window.refusal("update_weights_from_tensor")) is not None:
            return answer(False, refused)
        if len(b.serialized_named_tensors) != 1:  # one entry per TP rank; we have one
            return answer(False, "serialized_named_tensors must be a list with one entry (tp_size 1)")
        try:
            named = deserialize_named_tensors(b.serialized_named_tensors[0], b.load_format)
        except Exception as exc:  # noqa: BLE001 - malformed or blocked payload
            return answer(False, f"Failed to read serialized_named_tensors: {type(exc).__name__}: {exc}")
        return answer(*engine.load_weights(named, b.weight_version, b.abort_all_requests))

    return app


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
