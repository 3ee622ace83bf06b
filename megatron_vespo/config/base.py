"""Config plumbing: YAML files plus dotted CLI overrides, validated by pydantic.

Each component owns its config class (``losses.config.LossConfig``,
``train.config.TrainConfig`` ...); ``config.job.JobConfig`` composes them. We use
pydantic (a well-kept library) for type checking, unknown-key rejection and
``Literal`` choices; this module only adds YAML loading, ``key.sub=value``
overrides and error messages that name the dotted key to change.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and file) to fix."""


def _non_finite(value: Any, path: str) -> list[str]:
    """Dotted paths of the NaN / inf floats inside ``value`` (nested dicts and lists; sections excluded)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{path}={value}"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{path}[{i}]")]
    return []


class Section(BaseModel):
    """Base class of every component config: unknown keys are errors, assignment is validated.

    No float anywhere in a config may be NaN or inf (``.nan`` / ``.inf`` in YAML): ``train.lr=.inf``
    would only surface as NaN log-probs later, ``loss.params.c1_pos=.nan`` would silently zero a
    loss term. Typed float fields are refused by pydantic (``allow_inf_nan=False``), free-form
    dicts and lists (``loss.params``, ``rollout.server_args``) by the check below.

    Every field carries a one-line docstring under its declaration (``use_attribute_docstrings``,
    as Megatron's ``TransformerConfig`` documents its fields); ``megatron-vespo config --explain``
    prints them and ``tests/config/test_config_docs.py`` fails on a field without one.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False, use_attribute_docstrings=True)

    @model_validator(mode="after")
    def _finite_everywhere(self) -> "Section":
        bad = [p for name in type(self).model_fields for p in _non_finite(getattr(self, name), name)
               if not isinstance(getattr(self, name), BaseModel)]
        if bad:
            raise ValueError(f"non-finite value(s) {', '.join(bad)}: every number in a config must be finite")
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"train.lr=1e-6"`` into (["train", "lr"], 1e-6); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. train.lr=1e-6)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with every ``key.sub=value`` override applied."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{'.'.join(path[: i + 1])}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return data


def _section_keys(cls: type[BaseModel] | None, parents: tuple) -> list[str]:
    """Field names of the section at ``parents`` below ``cls`` ([] when it cannot be resolved)."""
    for part in parents:
        field = cls.model_fields.get(str(part)) if cls is not None else None
        ann = field.annotation if field is not None else None
        # Optional[Section] and the like: take the one BaseModel among the type arguments
        cands = [ann, *getattr(ann, "__args__", ())]
        cls = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return list(cls.model_fields) if cls is not None else []


def _unknown_key_message(cls: type[BaseModel] | None, loc: tuple) -> str:
    """'unknown key', with the closest valid key (a likely typo) or the valid keys of that section."""
    keys = _section_keys(cls, loc[:-1])
    if not keys:
        return "unknown key (check the spelling; see the component's config class for valid keys)"
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key; valid keys here: {', '.join(keys)}"


def _format_errors(exc: ValidationError, source: str, cls: type[BaseModel] | None = None) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = _unknown_key_message(cls, tuple(err["loc"]))
        elif err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return f"invalid config{source}:\n" + "\n".join(lines)


def validate(cls: type[M], data: dict, source: str = "") -> M:
    """Build ``cls`` from a plain dict, raising ConfigError that names each bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, f" ({source})" if source else "", cls)) from None


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping from ``path`` (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[M], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> M:
    """Load ``cls`` from an optional YAML file plus dotted overrides."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    source = str(path) if path is not None else "overrides"
    return validate(cls, data, source)


def _type_name(annotation: Any) -> str:
    """``int``, ``Optional[Literal['a', 'b']]`` ...: the annotation as a reader writes it."""
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The Section class a field holds (itself or inside Optional[...]), else None."""
    cands = [annotation, *getattr(annotation, "__args__", ())]
    return next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)


def explain_fields(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, doc) of every leaf field below ``cls``, nested sections expanded."""
    rows = []
    for name, field in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        sub = _section_of(field.annotation)
        if sub is not None:
            rows.extend(explain_fields(sub, dotted + "."))
            continue
        if field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        doc = " ".join((field.description or "").split())
        rows.append((dotted, _type_name(field.annotation), default, doc))
    return rows


def dump_config(cfg: BaseModel) -> str:
    """Render a config as YAML (what a run records next to its outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
