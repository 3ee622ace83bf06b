"""Training checkpoints: save and resume the Megatron actor exactly.

Layout of ``save_dir``::

    latest_checkpointed_iteration.txt   iteration of the newest *complete* checkpoint
    iter_0000010/
        megatron_vespo_checkpoint.json  model metadata (+ iteration)     } a model checkpoint:
        model/  hf/                     dist_checkpointing + HF config   } mcore-to-hf reads it
        optimizer/                      dist_checkpointing of the Megatron optimizer's sharded state
        rng/rank_00000.pt ...           python / numpy / torch / CUDA / Megatron RNG-tracker states
        trainer_state.pt                LR scheduler state_dict + ``state`` (iteration, policy
                                        version, data-loader position, config ...)
        trainer_state.json              the JSON-able part of ``state``, for people and tools

Writes are atomic: the iteration directory is written under a temporary name, renamed when every
rank finished, and only then does ``latest_checkpointed_iteration.txt`` (itself replaced
atomically) move to it; old iterations beyond ``keep_last`` are deleted afterwards. A crash at
any point leaves the pointer on a complete checkpoint. An iteration directory newer than the
pointer (killed between rename and pointer update) is not trusted: it is replaced when that
iteration is saved again, and ``clean_save_dir`` removes it, and ``.partial`` / ``.tmp``
leftovers, when a run starts. The pickled files are read with ``weights_only=True``
(``checkpoint.safety``); kill points for tests are in ``checkpoint.faults``.

Model and optimizer states are sharded by global tensor (not by rank), so a checkpoint loads
under another TP/EP/PP layout. RNG states are per rank and restored only under the same world
size (otherwise a warning names what is skipped).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_vespo.checkpoint import dist
from megatron_vespo.checkpoint.faults import fault_point
from megatron_vespo.checkpoint.hf_weights import unwrap_model
from megatron_vespo.checkpoint.model_ckpt import LOAD_ERRORS, load_model_checkpoint, write_model_checkpoint
from megatron_vespo.checkpoint.safety import explain_disk_full, safe_torch_load
from megatron_vespo.utils.io import atomic_path

logger = logging.getLogger(__name__)

LATEST_NAME = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(save_dir: str | os.PathLike, iteration: int) -> Path:
    """``save_dir/iter_XXXXXXX``."""
    return Path(save_dir) / f"iter_{iteration:07d}"


def latest_iteration(save_dir: str | os.PathLike) -> Optional[int]:
    """The iteration ``latest_checkpointed_iteration.txt`` points to, or None when there is none."""
    path = Path(save_dir) / LATEST_NAME
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, got {text!r}")
    return int(text)


def latest_iteration_dir(save_dir: str | os.PathLike) -> Path:
    """Directory of the newest complete checkpoint in ``save_dir`` (ValueError if none)."""
    it = latest_iteration(save_dir)
    if it is None:
        raise ValueError(f"{save_dir}: no {LATEST_NAME}; no complete checkpoint was saved there")
    path = iteration_dir(save_dir, it)
    if not path.is_dir():
        raise ValueError(f"{Path(save_dir) / LATEST_NAME} points to iteration {it} but {path} does not exist")
    return path


def list_iterations(save_dir: str | os.PathLike) -> list[int]:
    """Iterations with a (renamed, hence complete) directory in ``save_dir``, ascending."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in save_dir.iterdir() if p.is_dir() and (m := _ITER_RE.match(p.name)))


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Delete what killed atomic writes left in ``directory``: ``.*.partial`` directories, ``.*.tmp`` files.

    Both are private names of ``atomic_dir`` / ``atomic_path`` that are never read; at 30B scale
    one partial checkpoint is hundreds of GB. Call it when no other process writes there.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        if not p.name.startswith("."):
            continue
        if p.name.endswith(".partial") and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(".tmp") and (p.is_file() or p.is_symlink()):
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
        logger.warning("removed %s, left by a write that was killed", p)
    return removed


def clean_save_dir(save_dir: str | os.PathLike, keep: Optional[str | os.PathLike] = None) -> list[Path]:
    """Start-of-run cleanup of ``save_dir`` (rank 0): leftovers, and iterations newer than the pointer.

    ``iter_*`` and ``hf/iter_*`` directories newer than ``latest_checkpointed_iteration.txt`` were
    renamed by a run killed before it moved the pointer: the resumed run writes those iterations
    again, so they are removed (``keep``, a directory being loaded, never is). Without a pointer
    nothing is judged newer (``save_trainer_checkpoint`` still replaces the iteration it saves).
    """
    save_dir = Path(save_dir)
    removed = remove_leftovers(save_dir) + remove_leftovers(save_dir / "hf")
    latest = latest_iteration(save_dir)
    if latest is None:
        return removed
    keep = Path(keep).resolve() if keep is not None else None
    for parent in (save_dir, save_dir / "hf"):
        if not parent.is_dir():
            continue
        for p in sorted(parent.iterdir()):
            m = _ITER_RE.match(p.name)
            if m and p.is_dir() and int(m.group(1)) > latest and p.resolve() != keep:
                logger.warning("removing %s: newer than %s (%d), written by a run killed before the pointer "
                               "moved; this run writes it again", p, LATEST_NAME, latest)
                shutil.rmtree(p)
                removed.append(p)
    return removed


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG stream a training step may draw from."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key array as a tensor: the file then holds only tensors and plain data (weights_only loads it)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["megatron_tracker"] = get_cuda_rng_tracker().get_states()
    except (ImportError, RuntimeError):
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    import numpy as np

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_tracker"])


# ----------------------------------------------------------------------------- loading
def read_rng_state(ckpt: str | os.PathLike) -> Optional[dict]:
    """This rank's saved RNG states in the iteration directory ``ckpt``, or None (with a warning) when they
    were saved under another world size or are missing."""
    ckpt = Path(ckpt)
    world = torch.distributed.get_world_size() if dist.is_initialized() else 1
    rng_file = ckpt / "rng" / f"rank_{dist.rank():05d}.pt"
    rng = safe_torch_load(rng_file) if rng_file.is_file() else None
    if rng is None or rng.get("world_size") != world:
        logger.warning("%s: RNG states were saved with another world size (or are missing); not restored", ckpt)
        return None
    return rng["rng"]


def resolve_checkpoint(load_dir: str | os.PathLike, iteration: Optional[int] = None) -> Path:
    """The iteration directory ``load_dir`` names: ``iteration`` of a save dir, its latest, or itself."""
    load_dir = Path(load_dir)
    if iteration is not None:
        return iteration_dir(load_dir, iteration)
    if (load_dir / LATEST_NAME).is_file():
        return latest_iteration_dir(load_dir)
    return load_dir


# ----------------------------------------------------------------------------- optimizer
def _optimizer_sharded_state(optimizer: Any, model: Any, is_loading: bool) -> dict:
    from megatron_vespo.checkpoint.model_ckpt import strip_extra_state

    model_sd = strip_extra_state(unwrap_model(model).sharded_state_dict())
    # fully_reshardable: the distributed optimizer's state is stored per parameter (model space),
    # so it reloads under another DP/TP/EP layout, like the model.
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                        metadata={"distrib_optim_sharding_type": "fully_reshardable"})


def _prime_empty_adam_state(optimizer: Any) -> None:
    """Give a fresh torch Adam inside a Megatron optimizer zero state (step 0) before loading into it.

    megatron-core 0.16.1 ``DistributedOptimizer.state_dict()`` (``optimizer/distrib_optimizer.py:642``)
    asserts that every parameter has a ``step`` when neither Apex nor TE is installed, but a freshly
    built optimizer has no state yet, so loading a checkpoint into it fails. The primed values are
    replaced by the loaded ones.
    """
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW) or len(inner.state):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p.data),
                                  "exp_avg_sq": torch.zeros_like(p.data)}


def _saved_layout(ckpt: Path) -> Any:
    try:
        return json.loads((ckpt / "megatron_vespo_checkpoint.json").read_text()).get("saved_layout")
    except (OSError, ValueError):
        return "unknown"


def _unshare_adam_steps(optimizer: Any) -> None:
    """Give every parameter its own ``step`` tensor after a load.

    ``DistributedOptimizer.load_state_dict`` (``distrib_optimizer.py:823``) assigns one step
    tensor object to every parameter and torch Adam keeps it as is, so the in-place ``step += 1``
    of each parameter would advance the shared counter once per parameter per update.
    """
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if isinstance(st, dict) and isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def _json_part(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _json_part(v) for k, v in obj.items()}
        return repr(obj)


# ----------------------------------------------------------------------------- save / load
def save_trainer_checkpoint(save_dir: str | os.PathLike, iteration: int, *, model: Any, hf_cfg: Any,
                            optimizer: Any = None, scheduler: Any = None, state: Optional[dict] = None,
                            keep_last: int = 2, source_dir: Optional[str] = None) -> Path:
    """Save everything needed to resume at ``iteration`` (collective; every rank calls it).

    Args:
        model: the model (chunk list, DDP-wrapped or bare ``GPTModel``).
        hf_cfg: HF config of the model (stored in ``hf/`` so the checkpoint converts to HF).
        optimizer / scheduler: Megatron optimizer and ``OptimizerParamScheduler`` (optional).
        state: trainer state to restore verbatim, e.g. ``{"policy_version": 7,
            "data": loader.state_dict(), "config": job_cfg.model_dump()}``.
        keep_last: iteration directories to keep (older ones are deleted after the pointer moved).
        source_dir: HF directory whose tokenizer / generation files are copied into ``hf/``.
    """
    from megatron.core import dist_checkpointing

    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    save_dir = Path(save_dir)
    target = iteration_dir(save_dir, iteration)
    if dist.rank() == 0:
        _drop_untrusted(save_dir, iteration)
    dist.barrier()
    full_state = {"iteration": int(iteration), **(state or {})}
    with dist.dist_atomic_dir(target) as tmp:
        try:
            write_model_checkpoint(model, tmp, hf_cfg, source_dir=source_dir,
                                   extra_meta={"iteration": int(iteration)})
            if optimizer is not None:
                if dist.rank() == 0:
                    (tmp / "optimizer").mkdir()
                dist.barrier()
                sharded = _optimizer_sharded_state(optimizer, model, is_loading=False)
                dist_checkpointing.save(sharded, str(tmp / "optimizer"))
            (tmp / "rng").mkdir(exist_ok=True)
            world = torch.distributed.get_world_size() if dist.is_initialized() else 1
            torch.save({"world_size": world, "rng": rng_state()}, tmp / "rng" / f"rank_{dist.rank():05d}.pt")
            if dist.rank() == 0:
                torch.save({"scheduler": scheduler.state_dict() if scheduler is not None else None,
                            "state": full_state}, tmp / "trainer_state.pt")
                (tmp / "trainer_state.json").write_text(json.dumps(_json_part(full_state), indent=2,
                                                                   default=str) + "\n")
        except Exception as exc:
            disk_full = explain_disk_full(exc, tmp, f"saving checkpoint iteration {iteration}",
                                          f"{LATEST_NAME} still names iteration {latest_iteration(save_dir)}")
            if disk_full is None:
                raise
            raise disk_full from exc
        dist.barrier()
        fault_point("ckpt_written", iteration)
    fault_point("ckpt_renamed", iteration)
    if dist.rank() == 0:
        with atomic_path(save_dir / LATEST_NAME) as fh:
            fh.write(f"{int(iteration)}\n")
            fh.flush()
            fault_point("pointer_tmp", iteration)
        _rotate(save_dir, keep_last, int(iteration))
    dist.barrier()
    fault_point("ckpt_saved", iteration)
    logger.info("saved training checkpoint %s", target)
    return target


def _drop_untrusted(save_dir: Path, iteration: int) -> None:
    """Remove ``iter_<iteration>`` when the pointer is older (or absent): a killed run renamed it, never pointed to it.

    Such a directory is complete but was never confirmed: it may come from a run that went on
    another way (a different config, an async trajectory). The iteration is about to be saved
    again from the live state, so the directory is replaced rather than kept.
    """
    target = iteration_dir(save_dir, iteration)
    latest = latest_iteration(save_dir)
    if target.exists() and (latest is None or iteration > latest):
        logger.warning("%s is newer than %s (%s): it was written by a run killed before the pointer moved; "
                       "replacing it", target, LATEST_NAME, latest)
        shutil.rmtree(target)


def _rotate(save_dir: Path, keep_last: int, latest: int) -> None:
    iters = [i for i in list_iterations(save_dir) if i != latest]
    for it in iters[: max(len(iters) - (keep_last - 1), 0)]:
        shutil.rmtree(iteration_dir(save_dir, it), ignore_errors=True)
        logger.info("removed old checkpoint iteration %d", it)


def load_trainer_checkpoint(load_dir: str | os.PathLike, *, model: Any, optimizer: Any = None,
                            scheduler: Any = None, iteration: Optional[int] = None,
                            load_rng: bool = True) -> dict:
    """Restore a training checkpoint into live objects (collective) and return the saved ``state``.

    ``load_dir`` is a save directory (its latest iteration, or ``iteration``) or an ``iter_*``
    directory. The model and optimizer load under any layout; RNG states need the same world size.
    """
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint(load_dir, iteration)
    if not (ckpt / "trainer_state.pt").is_file():
        raise ValueError(f"{ckpt}: not a training checkpoint (no trainer_state.pt)")
    # the small pickled files first: a refused or corrupt one fails before minutes of model loading
    saved = safe_torch_load(ckpt / "trainer_state.pt")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or "iteration" not in saved["state"]:
        raise ValueError(f"{ckpt / 'trainer_state.pt'}: not a trainer state (expected a dict with "
                         "'scheduler' and 'state' holding 'iteration')")
    rng = read_rng_state(ckpt) if load_rng else None
    load_model_checkpoint(model, ckpt)
    if optimizer is not None:
        if not (ckpt / "optimizer" / "metadata.json").is_file():
            raise ValueError(f"{ckpt / 'optimizer'}: no optimizer state in this checkpoint")
        from megatron_vespo.compat.dist_ckpt import patch_torch_adam_resume

        patch_torch_adam_resume()
        _prime_empty_adam_state(optimizer)
        sharded = _optimizer_sharded_state(optimizer, model, is_loading=True)
        try:
            loaded = dist_checkpointing.load(sharded, str(ckpt / "optimizer"))
        except LOAD_ERRORS as exc:  # every rank sees the planner error (it is gathered), so all raise
            raise ValueError(
                f"{ckpt / 'optimizer'}: the optimizer state does not fit this optimizer ({type(exc).__name__}). "
                f"It was saved under layout {_saved_layout(ckpt)}; Megatron's optimizer state is keyed by its "
                "chained sub-optimizers, which change with the layout. Resume with the saved layout, or load "
                "the model only (optimizer=None) and start a fresh optimizer.") from exc
        optimizer.load_state_dict(loaded)
        _unshare_adam_steps(optimizer)
    if scheduler is not None and saved.get("scheduler") is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if rng is not None:
        set_rng_state(rng)
    logger.info("resumed from %s (iteration %d)", ckpt, saved["state"]["iteration"])
    return saved["state"]
