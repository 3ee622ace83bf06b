"""The embedded engine's HTTP routes: SGLang's endpoints and JSON shapes (FastAPI).

:func:`build_app` turns an :class:`~megatron_vespo.rollout.embedded.engine.EmbeddedEngine` into
the app; ``server.py`` runs it (uvicorn in a thread or a process, ``megatron-vespo serve``).
Endpoints, as SGLang's (``entrypoints/http_server.py``, sglang 0.5.23): ``/generate``,
``/health``, ``/health_generate``, ``/model_info`` (+ ``/get_model_info``), ``/server_info`` (+
``/get_server_info``), ``/flush_cache``, ``/update_weights_from_disk``,
``/update_weight_version``, ``/pause_generation``, ``/continue_generation``, ``/abort_request``,
``/freeze_gc``,
the update windows and the in-memory weight paths (``weight_update.py``). Bodies are validated
by ``schema.py`` (400 naming the field) and must come as ``application/json``, as SGLang's FastAPI
handlers require (``schema.is_json_content_type``).
"""

import asyncio
import logging
import threading
from typing import Any, Optional

from megatron_vespo.rollout.embedded.engine import EmbeddedEngine
from megatron_vespo.rollout.embedded.guards import abort_on_disconnect
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
from megatron_vespo.utils import fastjson
from megatron_vespo.utils.gc_control import freeze_gc
from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)

# The SGLang server API this engine follows (its /server_info "version"; clients pick features by it).
EMULATED_SGLANG_VERSION = "0.5.23-embedded"

def build_app(engine: EmbeddedEngine, server_info: Optional[dict] = None) -> Any:
    """The FastAPI app serving ``engine``."""
    fastapi = require("fastapi", "the embedded rollout server")
    from fastapi import Depends, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    app = fastapi.FastAPI(title="megatron_vespo embedded rollout server")
    info = dict(server_info or {})

    def error(msg: str, status: int = 400) -> Any:
        return JSONResponse({"error": {"message": msg}}, status_code=status)

    async def body_of(request: Any, required: bool = True) -> Any:
        # RequestError (-> 400) when not JSON, not sent as JSON, or missing where SGLang requires it.
        # Every body is read here (the sync handlers get it through Depends), so the rule does not
        # depend on how the installed FastAPI parses a Body() parameter
        return parse_body(await request.body(), request.headers.get("content-type"), required=required)

    async def json_body(request: Request) -> Any:  # a body model SGLang requires
        return await body_of(request)

    async def json_body_or_empty(request: Request) -> Any:  # a body whose fields all have defaults
        return await body_of(request, required=False)

    async def body_as(request: Any, model: Any, required: bool = True) -> Any:
        return validate(model, await body_of(request, required))  # RequestError (-> 400) names the field

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
        texts = engine.decode_batch([r.output_ids for r in done]) if decode is not None else [None] * len(done)
        outs = [render_response(r, engine.weight_version, decode, text) for r, text in zip(done, texts)]
        # orjson bytes, as SGLang's ORJSONResponse (utils/fastjson.py: ~10x faster than json here)
        return Response(fastjson.dumps(outs if batched else outs[0]), media_type="application/json")

    @app.api_route("/freeze_gc", methods=["GET", "POST"])
    def freeze_gc_route():  # sync: FastAPI runs it in a thread, off the event loop (a collection takes ~0.1-0.5 s)
        freeze_gc(f"the embedded server ({engine.model_path})")
        return PlainTextResponse("Garbage collection frozen.\n")  # SGLang's answer

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

    @app.post("/update_weights_from_disk")
    def update_weights_from_disk(body: Any = Depends(json_body)):  # sync: FastAPI runs it in a thread
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
    def update_weight_version(body: Any = Depends(json_body)):
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
        # no body model in sglang 0.5.x before the mode argument: an empty body is the default mode
        engine.pause((await body_as(request, PauseIn, required=False)).mode)
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
        selector = validate(BeginWeightUpdateIn, await body_of(request, required=False)).selector
        return answer(*window.begin(selector, generating=engine.busy and not engine.paused))

    @app.post("/end_weight_update")
    async def end_weight_update():
        return answer(*window.end())

    @app.post("/init_weights_update_group")
    def init_weights_update_group(body: Any = Depends(json_body)):  # sync: blocks until the group formed
        b = validate(InitGroupIn, body)
        return answer(*engine.weight_groups.init(b.master_address, b.master_port, b.rank_offset, b.world_size,
                                                 b.group_name, b.backend))

    @app.post("/destroy_weights_update_group")
    def destroy_weights_update_group(body: Any = Depends(json_body_or_empty)):
        return answer(*engine.weight_groups.destroy(validate(DestroyGroupIn, body).group_name))

    @app.post("/update_weights_from_distributed")
    def update_weights_from_distributed(body: Any = Depends(json_body)):
        b = validate(UpdateFromDistributedIn, body)
        if (refused := window.refusal("update_weights_from_distributed")) is not None:
            return answer(False, refused)  # like SGLang: before receiving, so the broadcast stays pending
        try:  # receive first, whatever the names: the trainer's broadcast must be consumed
            named = engine.weight_groups.receive(b.group_name, b.names, b.dtypes, b.shapes, b.load_format)
        except ValueError as exc:
            return answer(False, str(exc))
        return answer(*engine.load_weights(named, b.weight_version, b.abort_all_requests))

    @app.post("/update_weights_from_tensor")
    def update_weights_from_tensor(body: Any = Depends(json_body)):
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
