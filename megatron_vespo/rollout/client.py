"""Async HTTP client of an SGLang server (or our embedded CPU server, same protocol).

One client per engine URL. Requests share an ``httpx.AsyncClient`` and a semaphore
(``max_concurrency`` in flight). Connection errors and 5xx answers are retried with exponential
backoff; a timeout is not retried (the engine may still be generating) and raises
:class:`EngineTimeoutError` naming the URL. ``generate`` returns :class:`~megatron_vespo.types.Sample`
objects, flagged rather than raised when the engine's data is inconsistent (see ``protocol``).

Endpoint names and bodies follow sglang 0.5.23 ``entrypoints/http_server.py``. The weight-update
endpoints come from the :class:`~megatron_vespo.rollout.weight_api.WeightUpdateEndpoints` mixin;
the errors (re-exported here) from ``rollout/errors.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch

from megatron_vespo.rollout.config import RolloutConfig, SamplingConfig
from megatron_vespo.rollout.errors import (  # noqa: F401 - re-exported: callers catch them from here
    EngineHTTPError,
    EngineTimeoutError,
    EngineUnreachableError,
    RolloutEngineError,
)
from megatron_vespo.rollout.protocol import (
    batch_log_probs,
    build_batch_payload,
    build_generate_payload,
    response_to_sample,
)
from megatron_vespo.rollout.routes import RouteSpec
from megatron_vespo.rollout.weight_api import WEIGHT_WINDOW_MIN_VERSION, WeightUpdateEndpoints, parse_version  # noqa: F401
from megatron_vespo.types import Sample
from megatron_vespo.utils import fastjson
from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)
_JSON_HEADERS = {"content-type": "application/json"}


class SGLangClient(WeightUpdateEndpoints):
    """Client of one engine at ``url`` (``http://host:port``).

    Args:
        url: engine base URL.
        route_spec: route shape of the served model; needed when ``return_routed_experts``.
        return_routed_experts: request routes (R3) and flag samples whose routes are bad.
        max_concurrency: requests in flight at once from this client.
        timeout_s: per-request timeout (connect + read).
        max_retries / backoff_s: retries on connection errors and 5xx, delay ``backoff_s * 2**i``.
        flag_retracted: see ``RolloutConfig.flag_retracted``.
        transport: optional ``httpx`` transport (tests pass ``httpx.MockTransport``).
    """

    def __init__(self, url: str, *, route_spec: Optional[RouteSpec] = None, return_routed_experts: bool = False,
                 max_concurrency: int = 64, timeout_s: float = 600.0, max_retries: int = 3,
                 backoff_s: float = 0.5, flag_retracted: bool = True, transport: Any = None):
        httpx = require("httpx", "the rollout client")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"engine url must start with http:// or https://, got {url!r}")
        if return_routed_experts and route_spec is None:
            raise ValueError(f"return_routed_experts=True for {url} needs route_spec "
                             "(RouteSpec.from_hf_config(model_path) or await client.fetch_route_spec())")
        self.url = url.rstrip("/")
        self.route_spec = route_spec
        self.return_routed_experts = return_routed_experts
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.flag_retracted = flag_retracted
        self.outstanding = 0
        self.policy_version = 0
        self._sem = asyncio.Semaphore(max_concurrency)
        # Keep-alive pool as large as the requests in flight. Idle connections expire after 3 s,
        # below the 5 s keep-alive of uvicorn (SGLang's and our server's front): reusing a
        # connection the server is closing at that moment is the "ReadError" retry otherwise seen.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), trust_env=False, transport=transport,
                                       limits=httpx.Limits(max_connections=max_concurrency,
                                                           max_keepalive_connections=max_concurrency,
                                                           keepalive_expiry=3.0))
        self._httpx = httpx
        self.transport = transport  # copied by weight_sync.channel.EngineChannel for its own clients
        self._seq = itertools.count()

    @classmethod
    def from_config(cls, cfg: RolloutConfig, url: str, route_spec: Optional[RouteSpec] = None) -> "SGLangClient":
        """Client configured from a ``RolloutConfig``."""
        return cls(url, route_spec=route_spec, return_routed_experts=cfg.return_routed_experts,
                   max_concurrency=cfg.max_concurrency, timeout_s=cfg.request_timeout_s,
                   max_retries=cfg.max_retries, backoff_s=cfg.retry_backoff_s, flag_retracted=cfg.flag_retracted)

    async def __aenter__(self) -> "SGLangClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.aclose()

    # ---------------------------------------------------------------- transport
    async def request(self, method: str, path: str, json: Any = None, retry: bool = True) -> Any:
        """Send one request; returns parsed JSON (or text). Raises ``RolloutEngineError`` subclasses."""
        url = f"{self.url}{path}"
        attempts = self.max_retries + 1 if retry else 1
        last: Optional[Exception] = None
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                logger.warning("retrying %s %s in %.2fs (attempt %d/%d): %s", method, url, delay, attempt + 1,
                               attempts, last)
                await asyncio.sleep(delay)
            try:
                async with self._sem:
                    if json is None:
                        resp = await self._http.request(method, url)
                    else:  # orjson when installed (utils/fastjson.py); httpx's json= uses json.dumps
                        resp = await self._http.request(method, url, content=fastjson.dumps(json),
                                                        headers=_JSON_HEADERS)
            except self._httpx.TimeoutException as exc:
                raise EngineTimeoutError(f"{method} {url} timed out after {self.timeout_s}s "
                                         f"({type(exc).__name__}); is the engine overloaded or hung?") from exc
            except (self._httpx.TransportError, OSError) as exc:
                last = EngineUnreachableError(f"cannot reach rollout engine at {url}: {type(exc).__name__}: {exc}")
                continue
            if resp.status_code >= 500:
                last = EngineHTTPError(f"{method} {url} -> HTTP {resp.status_code}: {resp.text[:500]}",
                                       resp.status_code, resp.text)
                continue
            if resp.status_code >= 400:
                raise EngineHTTPError(f"{method} {url} -> HTTP {resp.status_code}: {resp.text[:500]}",
                                      resp.status_code, resp.text)
            if "json" in resp.headers.get("content-type", ""):
                return fastjson.loads(resp.content)
            return resp.text
        assert last is not None
        raise last

    # ---------------------------------------------------------------- generation
    async def generate(self, prompt_tokens: Sequence[int], sampling: SamplingConfig | Mapping[str, Any], *,
                       rid: Optional[str] = None, group_index: int = 0,
                       routed_experts_start_len: int = 0, prefix_routes: Optional[torch.Tensor] = None,
                       metadata: Optional[Mapping[str, Any]] = None) -> Sample:
        """Generate one response for ``prompt_tokens`` and return it as a ``Sample``.

        ``sampling`` is a ``SamplingConfig`` (its ``sampling_seed`` is a base seed: this call
        uses ``sampling_seed + k`` for the client's k-th request) or a raw SGLang
        ``sampling_params`` dict sent unchanged. ``rid`` (default: random) can be passed to
        ``abort_request``.
        """
        k = next(self._seq)
        if isinstance(sampling, SamplingConfig):
            seed = None if sampling.sampling_seed is None else sampling.sampling_seed + k
            params = sampling.to_sglang(seed)
        else:
            params = dict(sampling)
        rid = rid or uuid.uuid4().hex
        payload = build_generate_payload(prompt_tokens, params, rid=rid,
                                         return_routed_experts=self.return_routed_experts,
                                         routed_experts_start_len=routed_experts_start_len)
        self.outstanding += 1
        try:
            resp = await self.request("POST", "/generate", json=payload)
        finally:
            self.outstanding -= 1
        if not isinstance(resp, Mapping):
            raise EngineHTTPError(f"POST {self.url}/generate returned {type(resp).__name__}, expected a JSON "
                                  "object", 200, str(resp)[:500])
        md = {"engine_url": self.url, **(metadata or {})}
        return response_to_sample(resp, prompt_tokens, route_spec=self.route_spec,
                                  expect_routes=self.return_routed_experts,
                                  routed_experts_start_len=routed_experts_start_len, prefix_routes=prefix_routes,
                                  flag_retracted=self.flag_retracted, default_policy_version=self.policy_version,
                                  group_index=group_index, metadata=md)

    async def generate_many(self, prompts: Sequence[Sequence[int]], params: Sequence[Mapping[str, Any]], *,
                            group_indices: Sequence[int], metadata: Optional[Sequence[Mapping[str, Any]]] = None
                            ) -> list[Sample]:
        """One batched ``/generate`` for ``len(prompts)`` rows (``protocol.build_batch_payload``).

        ``params[i]`` is row i's raw SGLang ``sampling_params`` (its own ``sampling_seed``).
        A connection error or 5xx retries the whole body (same seeds, so the same samples);
        a 4xx raises ``EngineHTTPError``. Each answer is checked like a single response
        (``response_to_sample``: flagged, never raised, when inconsistent).
        """
        n = len(prompts)
        if not n:
            return []
        if len(params) != n or len(group_indices) != n or (metadata is not None and len(metadata) != n):
            raise ValueError("generate_many needs one sampling_params, group index (and metadata) per prompt")
        base = uuid.uuid4().hex
        rids = [f"{base}-{i}" for i in range(n)]
        payload = build_batch_payload(prompts, params, rids=rids, return_routed_experts=self.return_routed_experts)
        self.outstanding += n
        try:
            resp = await self.request("POST", "/generate", json=payload)
        finally:
            self.outstanding -= n
        if not isinstance(resp, list) or len(resp) != n:
            got = f"a list of {len(resp)}" if isinstance(resp, list) else type(resp).__name__
            raise EngineHTTPError(f"POST {self.url}/generate with a batch of {n} returned {got}, expected a list "
                                  f"of {n} (does this server take batch bodies? else set rollout.batch_requests="
                                  "false)", 200, str(resp)[:500])
        out = []
        checked = batch_log_probs(resp) or [None] * n  # one numpy pass; None: checked row by row
        for i, r in enumerate(resp):
            md = {"engine_url": self.url, **((metadata or [{}] * n)[i] or {})}
            out.append(response_to_sample(r, prompts[i], route_spec=self.route_spec,
                                          expect_routes=self.return_routed_experts,
                                          flag_retracted=self.flag_retracted,
                                          default_policy_version=self.policy_version,
                                          group_index=group_indices[i], metadata=md,
                                          checked_log_probs=checked[i]))
        return out

    async def generate_batch(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | Mapping[str, Any],
                             n_samples_per_prompt: int = 1) -> list[Sample]:
        """``n_samples_per_prompt`` samples for every prompt, one request each, concurrently;
        group_index = prompt index (the batched path is ``EngineRouter.generate_groups``)."""
        tasks = [self.generate(p, sampling, group_index=g) for g, p in enumerate(prompts)
                 for _ in range(n_samples_per_prompt)]
        return list(await asyncio.gather(*tasks))

    # ---------------------------------------------------------------- control
    async def health(self) -> bool:
        """True when ``GET /health`` answers 200 (no retries)."""
        return await self._answers("/health")

    async def health_generate(self) -> bool:
        """True when ``GET /health_generate`` (runs a 1-token generation) answers 200."""
        return await self._answers("/health_generate")

    async def _answers(self, path: str) -> bool:
        try:
            await self.request("GET", path, retry=False)
        except RolloutEngineError:
            return False
        return True

    async def wait_healthy(self, timeout_s: float = 60.0, interval_s: float = 0.2) -> None:
        """Poll ``/health`` until 200 or raise ``EngineTimeoutError`` naming the URL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if await self.health():
                return
            await asyncio.sleep(interval_s)
        raise EngineTimeoutError(f"rollout engine at {self.url} not healthy after {timeout_s}s")

    async def model_info(self) -> dict:
        """``/model_info`` (sglang >= 0.5.x), falling back to the older ``/get_model_info``."""
        return await self._get_or_legacy("/model_info", "/get_model_info")

    async def server_info(self) -> dict:
        """``/server_info`` with fallback to ``/get_server_info``."""
        return await self._get_or_legacy("/server_info", "/get_server_info")

    async def _get_or_legacy(self, path: str, legacy: str) -> Any:
        """``GET path``; on 404 (an older server) ``GET legacy``."""
        try:
            return await self.request("GET", path)
        except EngineHTTPError as exc:
            if exc.status_code != 404:
                raise
            return await self.request("GET", legacy)

    async def weight_version(self) -> str:
        """The engine's current weight version string (``model_info["weight_version"]``)."""
        return str((await self.model_info()).get("weight_version"))

    async def fetch_route_spec(self) -> RouteSpec:
        """Route shape of the served model, from ``model_info`` (embedded server) or its config.json."""
        info = await self.model_info()
        if all(k in info for k in ("num_hidden_layers", "num_experts_per_tok", "num_experts")):
            spec = RouteSpec.from_hf_config(info)
        elif info.get("model_path"):
            spec = RouteSpec.from_hf_config(info["model_path"])
        else:
            raise RolloutEngineError(f"{self.url}/model_info has neither MoE dims nor a model_path")
        self.route_spec = spec
        return spec

    async def flush_cache(self) -> None:
        """Flush the engine's prefix cache (``/flush_cache``)."""
        await self.request("POST", "/flush_cache")

    async def pause_generation(self, mode: str = "abort") -> None:
        """Pause the engine: ``abort`` (running requests return partial), ``retract`` or ``in_place``."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause mode must be abort, retract or in_place, got {mode!r}")
        await self.request("POST", "/pause_generation", json={"mode": mode})

    async def freeze_gc(self) -> None:
        """``POST /freeze_gc``: the server freezes its garbage collector's heap (SGLang's endpoint; an
        older server without it answers 404, raised as ``EngineHTTPError``)."""
        await self.request("POST", "/freeze_gc", retry=False)

    async def continue_generation(self) -> None:
        """Resume after ``pause_generation``."""
        await self.request("POST", "/continue_generation", json={})

    async def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """Abort request ``rid`` (or every request): it returns with finish_reason abort."""
        await self.request("POST", "/abort_request", json={"rid": rid, "abort_all": abort_all})
