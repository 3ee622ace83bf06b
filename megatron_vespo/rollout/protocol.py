"""SGLang ``/generate`` protocol: request payloads and response -> ``Sample`` conversion.

Checked against sglang 0.5.23 (PyPI wheel; ``managers/io_struct.py`` ``GenerateReqInput``,
``managers/tokenizer_manager.py`` ``_handle_batch_output`` / ``detokenize_logprob_tokens``,
``managers/schedule_batch.py`` ``FINISH_*``), and 0.5.9 for older fields. A non-streaming
response to one ``input_ids`` list is::

    {"text": str (absent with --skip-tokenizer-init), "output_ids": [int],
     "meta_info": {"id": rid, "finish_reason": {"type": "stop", "matched": int|str}
                                               | {"type": "length", "length": int}
                                               | {"type": "abort", "message": str, ...},
                   "prompt_tokens": int, "completion_tokens": int, "cached_tokens": int,
                   "weight_version": str, "weight_versions": [{"version", "start", "end"}] (0.5.2x),
                   "num_retractions": int (0.5.2x),
                   "output_token_logprobs": [[logprob, token_id, text|None], ...],
                   "input_token_logprobs": [...], "routed_experts": base64 str}}

Conversion never hands misaligned data to the trainer: any inconsistency sets
``SampleStatus.FLAGGED`` with the reasons in ``metadata["flag_reasons"]`` and drops the
offending field (log-probs or routes) from the sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_vespo.rollout.routes import RouteDecodeError, RouteSpec, decode_routes, stitch_routes
from megatron_vespo.types import Sample, SampleStatus

logger = logging.getLogger(__name__)

SGLANG_REFERENCE = "sglang 0.5.23 (PyPI wheel sglang-0.5.23-cp311), cross-checked with 0.5.9"

_STATUS = {"stop": SampleStatus.COMPLETED, "length": SampleStatus.TRUNCATED, "abort": SampleStatus.ABORTED}


def build_generate_payload(input_ids: Sequence[int], sampling_params: Mapping[str, Any], *,
                           rid: Optional[str] = None, return_logprob: bool = True,
                           return_routed_experts: bool = False, routed_experts_start_len: int = 0) -> dict:
    """The JSON body of one ``/generate`` request (``GenerateReqInput`` field names).

    ``logprob_start_len=-1`` asks for output-token log-probs only (SGLang then sets the
    start to the prompt length, so ``input_token_logprobs`` is empty).
    """
    if not input_ids:
        raise ValueError("input_ids is empty: a prompt needs at least one token")
    payload: dict[str, Any] = {
        "input_ids": [int(t) for t in input_ids],
        "sampling_params": dict(sampling_params),
        "return_logprob": bool(return_logprob),
        "logprob_start_len": -1,
        "return_routed_experts": bool(return_routed_experts),
    }
    if rid is not None:
        payload["rid"] = rid
    if routed_experts_start_len:
        if not 0 <= routed_experts_start_len <= len(input_ids):
            raise ValueError(f"routed_experts_start_len={routed_experts_start_len} must lie in "
                             f"[0, prompt length {len(input_ids)}]")
        payload["routed_experts_start_len"] = int(routed_experts_start_len)
    return payload


def build_batch_payload(input_ids: Sequence[Sequence[int]], sampling_params: Sequence[Mapping[str, Any]], *,
                        rids: Optional[Sequence[str]] = None, return_logprob: bool = True,
                        return_routed_experts: bool = False) -> dict:
    """The JSON body of one batched ``/generate``: one row per sequence, answered by a list in order.

    Batch fields as sglang's ``GenerateReqInput`` (``managers/io_struct.py``, checked at commit
    001067f of sgl-project/sglang, same fields as the 0.5.23 wheel): ``input_ids`` is a list of
    lists, ``sampling_params`` a list with one dict per row (so each row has its own
    ``sampling_seed``), ``rid`` a list of unique ids; ``return_logprob`` / ``logprob_start_len``
    are per batch here (scalars apply to every row), and ``return_routed_experts`` /
    ``routed_experts_start_len`` are scalars in SGLang, so only rows starting their routes at 0
    can share a batch.
    """
    if not input_ids:
        raise ValueError("a batched /generate needs at least one row")
    if len(sampling_params) != len(input_ids):
        raise ValueError(f"{len(sampling_params)} sampling_params for {len(input_ids)} rows")
    if rids is not None and (len(rids) != len(input_ids) or len(set(rids)) != len(rids)):
        raise ValueError("rids must be unique, one per row")
    rows = []
    for i, ids in enumerate(input_ids):
        if not ids:
            raise ValueError(f"input_ids[{i}] is empty: a prompt needs at least one token")
        rows.append([int(t) for t in ids])
    payload: dict[str, Any] = {
        "input_ids": rows,
        "sampling_params": [dict(p) for p in sampling_params],
        "return_logprob": bool(return_logprob),
        "logprob_start_len": -1,
        "return_routed_experts": bool(return_routed_experts),
    }
    if rids is not None:
        payload["rid"] = list(rids)
    return payload


def parse_weight_version(value: Any) -> Optional[int]:
    """SGLang weight versions are strings; ours are ints. ``"7"`` -> 7, ``"default"``/None -> None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _policy_version(meta: Mapping[str, Any], fallback: int) -> tuple[int, list]:
    """Oldest version that produced any token (conservative for staleness), and the spans."""
    spans = list(meta.get("weight_versions") or [])
    versions = [parse_weight_version(s.get("version")) for s in spans if isinstance(s, Mapping)]
    versions = [v for v in versions if v is not None]
    if versions:
        return min(versions), spans
    v = parse_weight_version(meta.get("weight_version"))
    return (fallback if v is None else v), spans


def _log_probs(meta: Mapping[str, Any], output_ids: list[int], flags: list[str]) -> Optional[torch.Tensor]:
    entries = meta.get("output_token_logprobs")
    if entries is None:
        flags.append("response has no meta_info.output_token_logprobs (return_logprob ignored?)")
        return None
    if len(entries) != len(output_ids):
        flags.append(f"{len(entries)} output_token_logprobs for {len(output_ids)} output_ids")
        return None
    if not entries:
        return torch.zeros(0, dtype=torch.float32)
    # numpy over the whole list (one C loop) rather than per-token Python; any entry the array
    # cannot take (wrong shape, non-numbers) is located by the per-entry check below.
    try:
        arr = np.asarray(entries, dtype=object)
        if arr.ndim != 2 or arr.shape[1] < 2:
            raise ValueError("ragged")
        lps = arr[:, 0].astype(np.float64)  # None -> nan: flagged as not finite below
        toks = arr[:, 1].astype(np.float64)  # compared as floats: 3.5 never passes for token 3
    except (ValueError, TypeError):
        return _log_probs_slow(entries, output_ids, flags)
    wrong = np.flatnonzero(toks != np.asarray(output_ids, dtype=np.float64))
    if wrong.size:
        i = int(wrong[0])
        flags.append(f"output_token_logprobs[{i}] is for token {entries[i][1]}, output_ids[{i}] is {output_ids[i]}")
        return None
    bad = np.flatnonzero(~np.isfinite(lps) | (lps > 1e-4))
    if bad.size:
        i = int(bad[0])
        flags.append(f"output_token_logprobs[{i}] = {entries[i][0]!r} is not a finite log-probability <= 0")
        return None
    return torch.from_numpy(lps.astype(np.float32))


def batch_log_probs(responses: Sequence[Any]) -> Optional[list[torch.Tensor]]:
    """The checked log-prob tensors of a whole batched answer in one numpy pass, or None.

    None whenever any row is not the plain consistent case (no ``output_token_logprobs``, a
    length or token mismatch, a non-finite or positive value, a malformed entry): the caller
    then checks row by row (``_log_probs``), which names the problem. Per-row numpy calls cost
    more than the arithmetic on short responses (8 tokens here), so one pass over the batch
    replaces 64 (issue 15).
    """
    entries, ids, sizes = [], [], []
    for r in responses:
        meta = r.get("meta_info") if isinstance(r, Mapping) else None
        lps = meta.get("output_token_logprobs") if isinstance(meta, Mapping) else None
        out = r.get("output_ids") if isinstance(r, Mapping) else None
        if not isinstance(lps, list) or not isinstance(out, list) or len(lps) != len(out):
            return None
        entries += lps
        ids += out
        sizes.append(len(out))
    if not entries:
        return [torch.zeros(0, dtype=torch.float32) for _ in sizes]
    try:
        arr = np.asarray(entries, dtype=object)
        if arr.ndim != 2 or arr.shape[1] < 2:
            return None
        lps = arr[:, 0].astype(np.float64)
        ok = bool((arr[:, 1].astype(np.float64) == np.asarray(ids, dtype=np.float64)).all())
    except (ValueError, TypeError):
        return None
    if not ok or not bool((np.isfinite(lps) & (lps <= 1e-4)).all()):
        return None
    return list(torch.from_numpy(lps.astype(np.float32)).split(sizes))


def _log_probs_slow(entries: Sequence[Any], output_ids: list[int], flags: list[str]) -> Optional[torch.Tensor]:
    """Per-entry check of a malformed ``output_token_logprobs`` list (names the first bad entry)."""
    values = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            flags.append(f"output_token_logprobs[{i}] is {entry!r}, expected [logprob, token_id, text]")
            return None
        lp, tok = entry[0], entry[1]
        if tok != output_ids[i]:
            flags.append(f"output_token_logprobs[{i}] is for token {tok}, output_ids[{i}] is {output_ids[i]}")
            return None
        if lp is None or not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 1e-4:
            flags.append(f"output_token_logprobs[{i}] = {lp!r} is not a finite log-probability <= 0")
            return None
        values.append(float(lp))
    return torch.tensor(values, dtype=torch.float32)


def _routes(meta: Mapping[str, Any], num_tokens: int, spec: RouteSpec, start_len: int,
            prefix_routes: Optional[torch.Tensor], flags: list[str]) -> Optional[torch.Tensor]:
    payload = meta.get("routed_experts")
    if payload is None:
        flags.append("R3 is on but the response has no meta_info.routed_experts (server started without "
                     "--enable-return-routed-experts?)")
        return None
    try:
        routes = decode_routes(payload, num_tokens=num_tokens, spec=spec, start_len=start_len)
        if start_len:
            if prefix_routes is None:
                raise RouteDecodeError(f"routed_experts_start_len={start_len} needs the prefix routes")
            routes = stitch_routes(prefix_routes, routes, start_len)
    except RouteDecodeError as exc:
        flags.append(f"routed_experts: {exc}")
        return None
    return routes


def response_to_sample(response: Mapping[str, Any], prompt_tokens: Sequence[int], *,
                       route_spec: Optional[RouteSpec] = None, expect_routes: bool = False,
                       expect_log_probs: bool = True, routed_experts_start_len: int = 0,
                       prefix_routes: Optional[torch.Tensor] = None, flag_retracted: bool = True,
                       default_policy_version: int = 0, group_index: int = 0,
                       metadata: Optional[Mapping[str, Any]] = None,
                       checked_log_probs: Optional[torch.Tensor] = None) -> Sample:
    """Convert one SGLang ``/generate`` response into a :class:`Sample` (flagged when inconsistent).

    Args:
        response: the JSON dict for one request.
        prompt_tokens: the ``input_ids`` that were sent.
        route_spec: model route shape; required when ``expect_routes``.
        expect_routes: R3 is on, so routes must be present and aligned.
        expect_log_probs: ``return_logprob`` was requested.
        routed_experts_start_len / prefix_routes: continued request (see ``decode_routes``).
        flag_retracted: flag R3 samples with ``num_retractions > 0`` (radixark/miles#3277).
        default_policy_version: used when the engine's weight version is not an integer.
        group_index, metadata: copied into the sample.
        checked_log_probs: this row's log-probs already decoded and checked (``batch_log_probs``).
    """
    if not isinstance(response, Mapping) or "meta_info" not in response or "output_ids" not in response:
        keys = sorted(response) if isinstance(response, Mapping) else type(response).__name__
        raise ValueError(f"not an SGLang /generate response (need output_ids and meta_info), got {keys}")
    if expect_routes and route_spec is None:
        raise ValueError("expect_routes=True needs route_spec (RouteSpec.from_hf_config(model_path))")
    meta = response["meta_info"]
    output_ids = [int(t) for t in response["output_ids"]]
    prompt = [int(t) for t in prompt_tokens]
    finish = meta.get("finish_reason") or {}
    status = _STATUS.get(finish.get("type") if isinstance(finish, Mapping) else None, SampleStatus.ABORTED)
    flags: list[str] = []

    if meta.get("prompt_tokens") not in (None, len(prompt)):
        flags.append(f"meta_info.prompt_tokens={meta['prompt_tokens']} but {len(prompt)} tokens were sent")
    if meta.get("completion_tokens") not in (None, len(output_ids)):
        flags.append(f"meta_info.completion_tokens={meta['completion_tokens']} but {len(output_ids)} output_ids")
    log_probs = None
    if expect_log_probs:
        log_probs = checked_log_probs if checked_log_probs is not None else _log_probs(meta, output_ids, flags)
    routes = None
    # A request aborted before its prefill has no routes (SGLang returns none): not an inconsistency.
    never_ran = status == SampleStatus.ABORTED and not output_ids and meta.get("routed_experts") is None
    if expect_routes and not never_ran:
        routes = _routes(meta, len(prompt) + len(output_ids), route_spec, routed_experts_start_len,
                         prefix_routes, flags)
        retractions = int(meta.get("num_retractions") or 0)
        if flag_retracted and retractions > 0:
            flags.append(f"request was retracted {retractions}x: SGLang may return re-prefill routes with the "
                         "original log-probs (radixark/miles#3277)")
            routes = None
    version, spans = _policy_version(meta, default_policy_version)

    md: dict[str, Any] = dict(metadata or {})
    md.update({"rid": meta.get("id"), "finish_reason": finish, "weight_version": meta.get("weight_version")})
    for key in ("weight_versions", "cached_tokens", "num_retractions", "e2e_latency"):
        if meta.get(key) is not None:
            md[key] = spans if key == "weight_versions" else meta[key]
    if response.get("text") is not None:
        md["text"] = response["text"]
    if flags:
        status = SampleStatus.FLAGGED
        md["flag_reasons"] = flags
        logger.warning("flagged rollout sample %s: %s", meta.get("id"), "; ".join(flags))
    return Sample(prompt_tokens=prompt, response_tokens=output_ids, rollout_log_probs=log_probs,
                  routed_experts=routes, group_index=group_index, policy_version=version,
                  status=status, metadata=md)
