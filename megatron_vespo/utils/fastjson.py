"""JSON for the rollout wire: orjson when installed, the standard library otherwise.

Why a helper and not ``json``: a batched ``/generate`` answer for 64 rows is ~35 KB of nested
log-prob lists, and on CPU the standard encoder took 1.0-1.4 ms to write it and 0.4-0.8 ms to
read it back, a tenth of the HTTP overhead issue 15 measured (docs/performance.md, "HTTP
transport"). orjson does both in ~0.1 ms. SGLang's own server answers with ``ORJSONResponse``
and runs on uvloop (python/sglang/srt/entrypoints/http_server.py, read at sgl-project/sglang
0025436), so the bytes our embedded server writes
are what a real server writes, including one rule: orjson writes a NaN or infinity as ``null``
where ``json.dumps`` would write the non-JSON token ``NaN``.

Reading accepts both: orjson is strict JSON, so a body it refuses is read again with ``json``,
which takes ``NaN``/``Infinity`` (an older server, or a hand-written request) and raises the usual
``json.JSONDecodeError`` (a ``ValueError``) for text that is not JSON at all.
"""

from __future__ import annotations

import json
from typing import Any

try:  # the [serve] / [cpu] extras install it; without it everything still works, slower
    import orjson
except ImportError:  # pragma: no cover - exercised by the fallback test through monkeypatch
    orjson = None

HAVE_ORJSON = orjson is not None


def dumps(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON bytes (NaN/inf as ``null``, as SGLang's server writes them)."""
    if orjson is not None:
        try:
            return orjson.dumps(obj)
        except orjson.JSONEncodeError:  # e.g. a non-str key or an int beyond 64 bits: json takes those
            pass
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a NaN or infinity somewhere: write it as null, as orjson does
        text = json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON text; ``NaN``/``Infinity`` tokens are accepted; ValueError when not JSON."""
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # maybe NaN/Infinity tokens, which the standard parser takes; else it raises
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw).decode("utf-8")
    return json.loads(raw)


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (orjson's rule, for the standard
    encoder; walked only when a first, strict encode found one)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
