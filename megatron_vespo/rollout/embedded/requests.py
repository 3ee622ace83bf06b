"""Parse SGLang ``/generate`` bodies into per-request state, and render SGLang responses.

Accepted fields are those of sglang 0.5.23 ``GenerateReqInput`` the engine implements; any other
field must hold its SGLang default (None / False / 0 / empty), else the request is rejected with
a ValueError naming it -- a silently ignored sampling option would make mu wrong. Types and
ranges of every field are checked first, in one place: ``schema.GenerateIn``.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from megatron_vespo.rollout.embedded.sampling import RowParams
from megatron_vespo.rollout.embedded.schema import GenerateIn, SamplingParamsIn, validate
from megatron_vespo.rollout.routes import encode_routes

_TOP_FIELDS = {"rid", "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
               "return_routed_experts", "routed_experts_start_len", "return_text_in_logprobs", "stream",
               "top_logprobs_num", "log_metrics"}
_SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "ignore_eos",
                    "sampling_seed", "n", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
_EVENT_LOCK = threading.Lock()  # GenRequest.done is made lazily, by whichever thread asks first
# Fields whose SGLang default we accept: they do not change what is sampled.
_DEFAULTS = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
             "min_new_tokens": 0}


@dataclass
class GenRequest:
    """One sequence to generate, plus its progress (filled by the engine)."""

    rid: str
    input_ids: list[int]
    params: RowParams
    max_new_tokens: int
    stop_token_ids: set[int]
    ignore_eos: bool
    sampling_seed: Optional[int]
    return_logprob: bool
    logprob_start_len: int
    return_routed_experts: bool
    routed_experts_start_len: int
    return_text_in_logprobs: bool = False
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[Optional[float]] = field(default_factory=list)
    routes: list[torch.Tensor] = field(default_factory=list)
    version_spans: list[list] = field(default_factory=list)  # [version, start]
    finish_reason: Optional[dict] = None
    aborted: Optional[str] = None
    created: float = field(default_factory=time.monotonic)
    on_done: Optional[Callable[["GenRequest"], None]] = None
    _event: Optional[threading.Event] = field(default=None, repr=False, compare=False)
    _finished: bool = field(default=False, repr=False, compare=False)

    @property
    def done(self) -> threading.Event:
        """Set once the request finished. Made on first use: a ``threading.Event`` per request cost
        ~6 us, 0.4 ms of parsing a 64-row batch whose HTTP handler never waits on it (issue 15)."""
        with _EVENT_LOCK:
            if self._event is None:
                self._event = threading.Event()
                if self._finished:
                    self._event.set()
            return self._event

    @property
    def is_done(self) -> bool:
        """Whether :meth:`finish` ran (no Event made)."""
        return self._finished

    def finish(self, reason: dict) -> None:
        """Mark finished and notify the waiter."""
        self.finish_reason = reason
        with _EVENT_LOCK:
            self._finished = True
            event = self._event
        if event is not None:
            event.set()
        if self.on_done is not None:
            self.on_done(self)


def _check_defaults(obj: dict, allowed: set, where: str) -> None:
    for key, value in obj.items():
        if key in allowed:
            continue
        if key in _DEFAULTS and value in (None, _DEFAULTS[key]):
            continue
        if value in (None, False, 0, "", [], {}):
            continue
        raise ValueError(f"{where}.{key}={value!r} is not supported by the embedded engine "
                         f"(supported: {sorted(allowed)})")


def _per_prompt(value: Any, n: int, name: str) -> list:
    """A scalar-or-list field as one value per prompt (SGLang: a list must have one entry per prompt)."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{name} is a list of {len(value)} but the batch has {n} prompt(s)")
        return value
    return [value] * n


def parse_generate(body: Any, *, vocab_size: int, max_len: int,
                   tokenize: Optional[Callable[[str], list[int]]]) -> tuple[list[GenRequest], bool]:
    """Requests of one ``/generate`` body, and whether the caller sent a batch (list answer).

    Types and ranges are checked by ``schema.GenerateIn`` (one place, SGLang's rules); this adds
    what depends on the model (vocabulary, context length) and on the batch (per-prompt lists).
    """
    req = validate(GenerateIn, body)
    _check_defaults(body, _TOP_FIELDS, "request")
    if req.stream:
        raise ValueError("stream=true is not supported by the embedded engine")
    if req.top_logprobs_num:
        raise ValueError("top_logprobs_num is not supported by the embedded engine")
    ids, text = req.input_ids, req.text
    if (ids is None) == (text is None):
        raise ValueError("give exactly one of input_ids and text")
    if text is not None:
        if tokenize is None:
            raise ValueError("text input needs a tokenizer, and this checkpoint has none: send input_ids")
        ids = [tokenize(t) for t in text] if isinstance(text, list) else tokenize(text)
    batched = bool(ids) and isinstance(ids[0], list)
    prompts = ids if batched else [ids]
    n = len(prompts)
    if isinstance(req.sampling_params, list) and not batched:  # SGLang: SamplingParams(**a list) fails too
        raise ValueError("sampling_params must be an object for a single prompt (a list needs a batch of prompts, "
                         "one entry each)")
    sps = _per_prompt(req.sampling_params if req.sampling_params is not None else SamplingParamsIn(), n,
                      "sampling_params")
    raw_sps = _per_prompt(body.get("sampling_params") or {}, n, "sampling_params")
    rids = _per_prompt(req.rid, n, "rid") if isinstance(req.rid, list) else None
    lp_flags = _per_prompt(req.return_logprob, n, "return_logprob")
    lp_starts = _per_prompt(req.logprob_start_len, n, "logprob_start_len")
    re_starts = _per_prompt(req.routed_experts_start_len or 0, n, "routed_experts_start_len")
    out = []
    for i, prompt in enumerate(prompts):
        if not prompt or not all(0 <= t < vocab_size for t in prompt):
            raise ValueError(f"input_ids[{i}] must be a non-empty list of token ids in [0, {vocab_size})")
        sp = sps[i]
        _check_defaults(raw_sps[i], _SAMPLING_FIELDS, "sampling_params")
        if sp.n not in (None, 1):
            raise ValueError("sampling_params.n must be 1 (send one request per sample)")
        temperature = 1.0 if sp.temperature is None else float(sp.temperature)
        top_p = 1.0 if sp.top_p is None else float(sp.top_p)
        top_k = -1 if sp.top_k is None else int(sp.top_k)
        max_new = 128 if sp.max_new_tokens is None else int(sp.max_new_tokens)
        if len(prompt) + max_new > max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new} exceeds the model's "
                             f"context length {max_len}")
        lp_start = len(prompt) if lp_starts[i] in (None, -1) else int(lp_starts[i])
        re_start = int(re_starts[i])
        if not 0 <= lp_start <= len(prompt):
            raise ValueError(f"logprob_start_len={lp_start} must be -1 or in [0, {len(prompt)}]")
        if not 0 <= re_start <= len(prompt):
            raise ValueError(f"routed_experts_start_len={re_start} must be in [0, prompt length {len(prompt)}]")
        if rids is not None:
            rid = str(rids[i])
        elif req.rid is not None:
            rid = f"{req.rid}_{i}" if batched else req.rid
        else:
            rid = uuid.uuid4().hex
        out.append(GenRequest(
            rid=rid, input_ids=list(prompt), params=RowParams.normalise(temperature, top_p, top_k),
            max_new_tokens=max_new, stop_token_ids=set(sp.stop_token_ids or []),
            ignore_eos=bool(sp.ignore_eos), sampling_seed=sp.sampling_seed,
            return_logprob=bool(lp_flags[i]), logprob_start_len=lp_start,
            return_routed_experts=bool(req.return_routed_experts), routed_experts_start_len=re_start,
            return_text_in_logprobs=bool(req.return_text_in_logprobs)))
    return out, batched


def render_response(req: GenRequest, weight_version: str, decode: Optional[Callable[[list[int]], str]],
                    text: Optional[str] = None) -> dict:
    """The SGLang response dict of a finished request (key order as SGLang's).

    ``decode`` (token ids -> text; None: no tokenizer, no ``text`` field) makes ``text`` unless the
    caller passes it, decoded for a whole batch at once (``EmbeddedEngine.decode_batch``).
    """
    t = len(req.output_ids)
    meta: dict[str, Any] = {
        "id": req.rid, "finish_reason": req.finish_reason, "prompt_tokens": len(req.input_ids),
        "weight_version": weight_version, "num_retractions": 0, "reasoning_tokens": 0, "completion_tokens": t,
        "cached_tokens": 0,
    }
    spans = req.version_spans or [[weight_version, 0]]
    meta["weight_versions"] = [{"version": v, "start": s, "end": (spans[j + 1][1] if j + 1 < len(spans) else t)}
                               for j, (v, s) in enumerate(spans) if s < t or s == 0]
    meta["weight_version"] = meta["weight_versions"][-1]["version"]  # as SGLang: the latest visible span
    with_text = decode is not None and req.return_text_in_logprobs
    text_of = (lambda tok: decode([tok])) if with_text else (lambda tok: None)
    if req.return_logprob:
        inputs = req.input_ids[req.logprob_start_len:]
        meta["input_token_logprobs"] = [[lp, tok, text_of(tok)] for lp, tok in zip(req.input_logprobs, inputs)]
        meta["output_token_logprobs"] = [[lp, tok, text_of(tok)] for lp, tok in zip(req.output_logprobs,
                                                                                     req.output_ids)]
        meta["output_token_logprobs_length"] = t
    if req.return_routed_experts and req.routes:  # absent when the request never ran (aborted in queue)
        rows = torch.cat(req.routes, dim=0)
        meta["routed_experts"] = encode_routes(rows[req.routed_experts_start_len: len(req.input_ids) + t - 1])
    meta["e2e_latency"] = time.monotonic() - req.created
    out: dict[str, Any] = {}
    if decode is not None:
        out["text"] = decode(req.output_ids) if text is None else text
    out["output_ids"] = list(req.output_ids)
    out["meta_info"] = meta
    return out
