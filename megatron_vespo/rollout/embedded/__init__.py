"""Embedded CPU rollout engine: HF transformers model behind SGLang's HTTP protocol.

Heavy imports (transformers, fastapi, uvicorn) happen inside the submodules' functions, so this
package imports with torch alone. Entry points: ``server.start_embedded_server``,
``engine.EmbeddedEngine``, ``models.save_tiny_checkpoint``.

Modules: ``engine`` (queue, worker thread, pause / control calls, weights) with its decode loop
in ``decode`` (prefill, KV cache, sampling, route capture; ``sampling``, ``capture``); ``app`` (the
FastAPI routes, bodies checked by ``schema``) run by ``server`` (uvicorn in a thread or a process,
``megatron-vespo serve``); ``requests`` (request parsing and response rendering); ``weight_update``
/ ``weight_checks`` / ``fp8_weights`` (in-memory weight loads); ``models``; ``guards``.
"""
