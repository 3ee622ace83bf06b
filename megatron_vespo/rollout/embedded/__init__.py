"""Embedded CPU rollout engine: HF transformers model behind SGLang's HTTP protocol.

Heavy imports (transformers, fastapi, uvicorn) happen inside the submodules' functions, so this
package imports with torch alone. Entry points: ``server.start_embedded_server``,
``engine.EmbeddedEngine``, ``models.save_tiny_checkpoint``.
"""
