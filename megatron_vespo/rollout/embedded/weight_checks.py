"""Checks a weight update must pass before the embedded engine serves it.

A weight update is all or nothing: the engine keeps serving the old weights unless every
check passes, and the error names the tensors (or the file) to fix.

* :func:`check_finite`: NaN / inf tensors are refused (one NaN weight makes every later
  ``/generate`` fail) -- all update paths (disk, tensor, distributed).
* :func:`read_checkpoint_tensors`: the tensors of an HF checkpoint directory, read with
  ``safetensors`` directly (not ``from_pretrained``, which fills a missing tensor with random
  init and ignores unexpected ones). Empty, truncated or header-corrupt files are a ValueError
  naming the file; a sharded checkpoint must hold exactly the tensors its index lists.
* :func:`check_complete`: a full checkpoint (``/update_weights_from_disk``) must cover every
  served parameter; tied parameters (``lm_head`` tied to the embedding) count as covered by
  either name, fused MoE experts by the fused name or every per-expert name.

SGLang's own disk loader (``DefaultModelLoader``, sglang 0.5.x ``model_loader/loader.py``) also
reads safetensors shards directly and lists the weights it did not initialise; we answer 400
instead of loading a partial model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from megatron_vespo.utils.imports import require

_SHOW = 5  # names listed per problem in an error message


def _names(items: Sequence[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _suspects(named: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The floating tensors of ``named`` that may hold NaN or inf, found by their minimum and maximum.

    A NaN makes both NaN and an infinity shows in one of them, so a tensor whose extremes are
    finite holds only finite values. ``torch.aminmax`` is one vectorised pass; ``torch.isfinite``
    per tensor was ~10x slower on CPU (~10 ms of each weight load of a 13 MB model, issue 15).
    Dtypes without a CPU ``aminmax`` (FP8) are always returned for the exact check.
    """
    extremes, names, out = [], [], []
    for name, t in named:
        if not (t.dtype.is_floating_point and t.numel()):
            continue
        try:
            lo, hi = torch.aminmax(t.detach())
        except (NotImplementedError, RuntimeError):
            out.append((name, t))
            continue
        extremes.append(torch.stack([lo.float(), hi.float()]))
        names.append((name, t))
    if extremes:
        finite = torch.isfinite(torch.stack(extremes)).all(dim=1).tolist()
        out += [nt for nt, ok in zip(names, finite) if not ok]
    return out


def check_finite(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Raise ValueError naming every tensor of ``named`` holding NaN or inf."""
    bad = []
    for name, t in _suspects(named):
        n_bad = int((~torch.isfinite(t)).sum())
        if n_bad:
            bad.append(f"{name} ({n_bad} of {t.numel()} values non-finite)")
    if bad:
        raise ValueError(f"{len(bad)} tensor(s) hold NaN or inf: {_names(bad)}")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    safetensors_torch = require("safetensors", "reading safetensors checkpoints").torch
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a safetensors checkpoint")
    try:
        return dict(safetensors_torch.load_file(str(path), device="cpu"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for every corruption
        raise ValueError(f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt header?): "
                         f"{type(exc).__name__}: {exc}") from None


def read_checkpoint_tensors(model_path: str | Path) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]`` of the HF checkpoint directory ``model_path`` (every ``*.safetensors`` file).

    Raises ValueError naming the directory or file: no ``config.json``, no safetensors files,
    a corrupt file, a tensor in two files, or a sharded checkpoint whose index disagrees with
    its shards.
    """
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model_path {path} is not an HF checkpoint directory (no config.json)")
    index_path = path / "model.safetensors.index.json"
    weight_map = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not a mapping")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index_path}: not a valid safetensors index ({exc})") from None
        files = sorted({path / str(f) for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model_path {path} holds no *.safetensors files (the embedded engine reads safetensors "
                         "only; pickled .bin checkpoints can run code when loaded)")
    out: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for f in files:
        if not f.is_file():
            raise ValueError(f"{index_path}: lists shard {f.name}, which does not exist")
        for name, t in _read_file(f).items():
            if name in out:
                raise ValueError(f"tensor {name} is in both {where[name]} and {f}")
            out[name], where[name] = t, f
    if weight_map is not None:
        unlisted = sorted(n for n in out if weight_map.get(n) != where[n].name)
        absent = sorted(n for n in weight_map if n not in out)
        if unlisted or absent:
            raise ValueError(f"{index_path} disagrees with its shards: listed but absent [{_names(absent)}], "
                             f"present but not listed there [{_names(unlisted)}]")
    return list(out.items())


def _per_expert_names(key: str, t: torch.Tensor) -> list[str]:
    """Checkpoint names that together make up the fused expert parameter ``key`` ([] if not fused)."""
    from megatron_vespo.rollout.embedded.weight_update import _FUSED  # here: weight_update imports this module

    m = _FUSED.fullmatch(key)
    if m is None or t.dim() != 3:
        return []
    pre, projs = m["prefix"], (("gate_proj", "up_proj") if m["kind"] == "gate_up_proj" else ("down_proj",))
    return [f"{pre}.{e}.{p}.weight" for e in range(t.shape[0]) for p in projs]


def check_complete(model: torch.nn.Module, names: Sequence[str]) -> None:
    """Raise ValueError naming the served parameters that ``names`` (a full checkpoint) does not cover."""
    given = set(names)
    groups: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        groups.setdefault((t.data.data_ptr(), t.data.numel()), []).append((key, t.data))
    missing: list[str] = []
    for members in groups.values():  # tied parameters share storage: one name of the group suffices
        gaps = []
        for key, t in members:
            parts = _per_expert_names(key, t)
            if key in given or (parts and all(p in given for p in parts)):
                break
            gaps.append([p for p in parts if p not in given] if parts and any(p in given for p in parts) else [key])
        else:
            missing.extend(gaps[0])
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) of the served model: "
                         f"{_names(sorted(missing))}")


def validate_full_checkpoint(model: torch.nn.Module, views: dict[str, torch.Tensor],
                             named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Every problem of a full checkpoint at once: unexpected, missing, mis-shaped, non-floating, non-finite."""
    problems = []
    unexpected = sorted(n for n, _ in named if n not in views)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) not in the served model: {_names(unexpected)}")
    try:
        check_complete(model, [n for n, _ in named])
    except ValueError as exc:
        problems.append(str(exc))
    shapes = [f"{n} {list(t.shape)} (served {list(views[n].shape)})" for n, t in named
              if n in views and tuple(t.shape) != tuple(views[n].shape)]
    if shapes:
        problems.append(f"shape mismatch for {len(shapes)} tensor(s): {_names(shapes)}")
    dtypes = [f"{n} ({t.dtype})" for n, t in named if not t.dtype.is_floating_point]
    if dtypes:
        problems.append(f"weights must be floating point: {_names(dtypes)}")
    try:
        check_finite(named)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
