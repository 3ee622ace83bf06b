"""One schema for every request body the embedded server accepts (pydantic, strict types).

Each endpoint's body is validated here before anything runs, so a wrong type or an out-of-range
value is a 400 naming the field -- never a 500 from deep inside the engine, and never one bad
request failing the batch it was scheduled with. Types and ranges follow SGLang:

* ``/generate``: ``GenerateReqInput`` (sglang 0.5.x ``srt/managers/io_struct.py``: ``input_ids``
  ``List[int] | List[List[int]]``, ``sampling_params`` ``Dict | List[Dict]`` with one entry per
  prompt, ``rid`` ``str | List[str]`` with one entry per prompt (``_normalize_rid``: "The
  specified rids length mismatch"), per-prompt lists for ``return_logprob`` /
  ``logprob_start_len``) and ``SamplingParams`` (``srt/sampling/sampling_params.py``, commit
  00c17ca: typed msgspec fields, ``verify()`` requires a finite ``temperature >= 0``, ``top_p``
  in (0, 1], ``top_k`` -1 or >= 1, ``max_new_tokens >= 0``, ``min_p`` in [0, 1], penalties in
  [-2, 2], ``repetition_penalty`` in (0, 2]). ``sampling_seed`` must fit the int64 seed SGLang
  builds a tensor from (and ``torch.Generator.manual_seed`` accepts); 2**64 is refused here
  instead of failing the batch (note: SGLang's deterministic mode packs seeds as int32).
* control endpoints: the ``*ReqInput`` dataclasses of the same ``io_struct.py``
  (``AbortReq.rid: str``, ``abort_all: bool``; ``UpdateWeightVersionReqInput.new_version: str``
  required; ``pause_generation`` ``mode`` one of abort / retract / in_place ...). Unknown keys of
  control bodies are ignored as FastAPI does for those dataclasses; unknown ``/generate`` and
  ``sampling_params`` keys are checked by ``requests.py`` (must hold SGLang's default).

Strictness: JSON numbers are not strings, ``true`` is not ``1``, ``1.5`` is not an int.
SGLang answers type errors with FastAPI's 422; we answer 400 with the field named (a client
treats both as "fix the request, do not retry").
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from megatron_vespo.utils import fastjson

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(ge=0)]
M = TypeVar("M", bound=BaseModel)


class RequestError(ValueError):
    """A request body that fails the schema; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", protected_namespaces=())


class SamplingParamsIn(_Strict):
    """``sampling_params`` of one prompt (SGLang ``SamplingParams`` fields and ranges)."""

    model_config = ConfigDict(strict=True, extra="allow", protected_namespaces=())

    temperature: Optional[Annotated[Finite, Field(ge=0)]] = None
    top_p: Optional[Annotated[Finite, Field(gt=0, le=1)]] = None
    top_k: Optional[int] = None
    min_p: Optional[Annotated[Finite, Field(ge=0, le=1)]] = None
    max_new_tokens: Optional[NonNegInt] = None
    min_new_tokens: Optional[NonNegInt] = None
    stop_token_ids: Optional[list[NonNegInt]] = None
    ignore_eos: Optional[bool] = None
    sampling_seed: Optional[Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]] = None
    n: Optional[Annotated[int, Field(ge=1)]] = None
    frequency_penalty: Optional[Annotated[Finite, Field(ge=-2, le=2)]] = None
    presence_penalty: Optional[Annotated[Finite, Field(ge=-2, le=2)]] = None
    repetition_penalty: Optional[Annotated[Finite, Field(gt=0, le=2)]] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    no_stop_trim: Optional[bool] = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v != -1 and v < 1:
            raise ValueError("top_k must be -1 (disable) or at least 1")
        return v


class GenerateIn(_Strict):
    """``/generate`` body (SGLang ``GenerateReqInput``); per-prompt lists are length-checked by ``requests.py``."""

    model_config = ConfigDict(strict=True, extra="allow", protected_namespaces=())

    text: Optional[Union[str, list[str]]] = None
    input_ids: Optional[Union[list[NonNegInt], list[list[NonNegInt]]]] = None
    sampling_params: Optional[Union[SamplingParamsIn, list[SamplingParamsIn]]] = None
    rid: Optional[Union[str, list[str]]] = None
    return_logprob: Optional[Union[bool, list[bool]]] = None
    logprob_start_len: Optional[Union[int, list[int]]] = None
    top_logprobs_num: Optional[Union[int, list[int]]] = None
    return_text_in_logprobs: Optional[bool] = None
    return_routed_experts: Optional[bool] = None
    routed_experts_start_len: Optional[Union[NonNegInt, list[NonNegInt]]] = None
    stream: Optional[bool] = None
    log_metrics: Optional[bool] = None


class AbortIn(_Strict):
    """``/abort_request`` (SGLang ``AbortReq``)."""

    rid: str = ""
    abort_all: bool = False


class PauseIn(_Strict):
    """``/pause_generation`` (SGLang ``PauseGenerationReqInput``)."""

    mode: Literal["abort", "retract", "in_place"] = "abort"


class BeginWeightUpdateIn(_Strict):
    """``/begin_weight_update`` (sglang 0.5.21+ ``BeginWeightUpdateReqInput``; an empty body means ``all``)."""

    selector: Literal["target", "draft", "all"] = "all"


class UpdateWeightVersionIn(_Strict):
    """``/update_weight_version`` (SGLang ``UpdateWeightVersionReqInput``: ``new_version`` is required)."""

    new_version: Annotated[str, Field(min_length=1)]
    abort_all_requests: bool = True


class UpdateFromDiskIn(_Strict):
    """``/update_weights_from_disk`` (SGLang ``UpdateWeightFromDiskReqInput``)."""

    model_path: Annotated[str, Field(min_length=1)]
    load_format: Optional[str] = None
    weight_version: Optional[str] = None
    abort_all_requests: bool = False


class InitGroupIn(_Strict):
    """``/init_weights_update_group`` (SGLang ``InitWeightsUpdateGroupReqInput``)."""

    master_address: Annotated[str, Field(min_length=1)]
    master_port: Annotated[int, Field(ge=1, le=65535)]
    rank_offset: NonNegInt
    world_size: Annotated[int, Field(ge=1)]
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class DestroyGroupIn(_Strict):
    """``/destroy_weights_update_group``."""

    group_name: str = "weight_update_group"


class UpdateFromDistributedIn(_Strict):
    """``/update_weights_from_distributed`` (SGLang ``UpdateWeightsFromDistributedReqInput``)."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[NonNegInt]]
    group_name: str = "weight_update_group"
    load_format: Optional[str] = None
    weight_version: Optional[str] = None
    abort_all_requests: bool = False
    flush_cache: bool = True


class UpdateFromTensorIn(_Strict):
    """``/update_weights_from_tensor`` (SGLang ``UpdateWeightsFromTensorReqInput``)."""

    serialized_named_tensors: list[str]
    load_format: Optional[str] = None
    weight_version: Optional[str] = None
    abort_all_requests: bool = False
    flush_cache: bool = True


def _where(loc: tuple) -> str:
    """``("sampling_params", "SamplingParamsIn", "temperature")`` -> ``sampling_params.temperature``."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif "[" in str(p) or str(p)[:1].isupper() or str(p) in ("str", "int", "bool", "float"):
            continue  # union-branch tags pydantic adds: not field names
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "<body>"


def error_message(exc: ValidationError, limit: int = 3) -> str:
    """One line naming each bad field (at most ``limit``): ``field: reason (got value)``."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        where = _where(tuple(err["loc"]))
        if where not in seen:
            got = repr(err.get("input"))
            seen[where] = f"{where}: {err['msg']} (got {got[:60]})"
    items = list(seen.values())
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


# SGLang's native endpoints take their body as a FastAPI body model (``obj: GenerateReqInput``,
# sglang entrypoints/http_server.py). FastAPI reads a body as JSON only when its content-type is
# application/json or application/*+json; with current FastAPI's ``strict_content_type`` (default True;
# fastapi/routing.py, read at 0.165.0) a body without a content-type is not read as JSON either.
# Anything else reaches the model as bytes and SGLang answers 400, as it does for a missing body.
# The embedded server reads every body through parse_body, which applies that rule itself.
def is_json_content_type(value: str | None) -> bool:
    """True for ``application/json`` and ``application/*+json`` (parameters such as charset allowed)."""
    if not value:
        return False
    media = value.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def parse_body(raw: bytes | str | None, content_type: str | None = "application/json", required: bool = False) -> Any:
    """JSON body -> Python object; RequestError when it is not JSON, as SGLang's FastAPI refuses it.

    An empty body is ``{}``, or a RequestError when ``required`` (an endpoint whose SGLang handler
    declares a body model). A non-empty body must come with a JSON ``content_type``.
    """
    if raw is None or not raw.strip():
        if required:
            raise RequestError("request body is required: send a JSON object with content-type application/json")
        return {}
    if not is_json_content_type(content_type):
        raise RequestError(f"content-type {content_type!r} is not JSON: SGLang reads a body only when it is sent "
                           "as application/json")
    try:
        return fastjson.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None


def validate(model: type[M], body: Any) -> M:
    """``body`` (parsed JSON, see :func:`parse_body`) as ``model``; RequestError naming the bad fields."""
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestError(error_message(exc)) from None
