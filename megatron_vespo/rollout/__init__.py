"""Rollout side: generate responses with SGLang (GPU) or the embedded CPU server, same protocol.

Per response the trainer gets a :class:`megatron_vespo.types.Sample` with tokens, the behaviour
policy's log-probs mu (SGLang convention: temperature-scaled, untruncated) and, for R3, the
experts every token was routed to. Modules:

* ``client``: async SGLang HTTP client -> ``Sample`` (validation, flagging, retries); its
  weight-update endpoints are in ``weight_api`` and its errors in ``errors``.
* ``router``: several engines (round robin / least outstanding).
* ``interfaces``: the ``Router`` and ``Engines`` protocols that ``weight_sync/``, ``evaluation/`` and
  the loops are typed with.
* ``routes``: base64 int32 route codec -> compact uint8 tensors.
* ``protocol``: request payloads and response parsing, pinned to an SGLang version.
* ``sglang_server`` / ``process``: launch / attach / stop servers.
* ``embedded``: the CPU engine and its FastAPI server.
"""
