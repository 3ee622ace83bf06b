"""Hugging Face checkpoint directories: reading, writing, and writing one from a live model.

Readers validate before anything is loaded: the architecture in ``config.json``, that every
shard the index names exists, and that the tensor names and shapes are exactly those the
Qwen3-MoE mapping expects. Writers stream tensors into size-limited safetensors shards with a
``model.safetensors.index.json`` inside a temporary directory that is renamed into place only
when complete. :func:`save_hf_checkpoint` writes the live (sharded) model this way; it is what
``convert mcore-to-hf``, disk weight sync and the best-checkpoint export use. The dtype names of
HF configs (:func:`dtype_name`, :func:`parse_dtype`) live here too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch

from megatron_vespo.checkpoint import dist
from megatron_vespo.checkpoint.hf_weights import DEFAULT_BUCKET_BYTES, iter_hf_weights, unwrap_model
from megatron_vespo.checkpoint.mapping import Qwen3MoeDims, expected_hf_names, hf_shape
from megatron_vespo.utils.imports import require

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of HF configs and ModelConfig)."""
    return _DTYPE_NAMES[dtype]


def parse_dtype(name: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """``"bfloat16"`` / ``"bf16"`` / a torch dtype -> torch dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    key = aliases.get(str(name), str(name))
    for dtype, dname in _DTYPE_NAMES.items():
        if dname == key:
            return dtype
    raise ValueError(f"unsupported dtype '{name}' (use float32, bfloat16 or float16)")


def config_dtype(cfg: Mapping[str, Any]) -> Optional[torch.dtype]:
    """The dtype an HF config declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    try:
        return parse_dtype(name) if name else None
    except ValueError:
        return None


def hf_config_dict(hf_cfg: Any) -> dict:
    """A plain dict of an HF config (``PretrainedConfig`` or mapping)."""
    return dict(hf_cfg) if isinstance(hf_cfg, Mapping) else hf_cfg.to_dict()


#: files never copied through to an exported HF directory (we write our own weights/index)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
_SKIP_NAMES = {INDEX_NAME, "pytorch_model.bin.index.json"}


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """Load ``config.json`` of ``hf_dir``; ValueError names the file when it is missing or not JSON."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no config.json (is {hf_dir} a Hugging Face checkpoint directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def hf_dims(hf_dir: str | os.PathLike) -> tuple[dict, Qwen3MoeDims]:
    """``(config dict, dims)`` of an HF directory, validated as Qwen3-MoE."""
    cfg = read_hf_config(hf_dir)
    return cfg, Qwen3MoeDims.from_hf_config(cfg, source=str(Path(hf_dir) / "config.json"))


class HFCheckpointReader:
    """Lazy access to the tensors of an HF safetensors checkpoint directory.

    Construction validates the file set; :meth:`validate_tensors` checks names and shapes against
    the mapping. Tensors are read on demand, one at a time, so a rank only loads what it needs.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        self._safe_open = require("safetensors", "reading HF checkpoints").safe_open
        self._handles: dict[str, object] = {}
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {exc}") from exc
            for shard in sorted(set(weight_map.values())):
                if not (self.dir / shard).is_file():
                    raise ValueError(f"{index} lists shard '{shard}' but {self.dir / shard} does not exist "
                                     "(incomplete download?)")
            self.weight_map: dict[str, str] = dict(weight_map)
        elif (self.dir / SINGLE_NAME).is_file():
            self.weight_map = {k: SINGLE_NAME for k in self._handle(SINGLE_NAME).keys()}
        else:
            raise ValueError(f"{self.dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found "
                             "(only safetensors checkpoints are supported)")

    def _handle(self, shard: str) -> object:
        # one open handle per shard: re-parsing a multi-GB shard's header for each of its
        # thousands of tensors would dominate the import of a 30B model
        if shard not in self._handles:
            self._handles[shard] = self._open_shard(self.dir / shard)
        return self._handles[shard]

    def _open_shard(self, path: Path) -> object:
        """``safe_open`` that answers an empty, truncated or header-corrupt file with a ValueError naming it.

        safetensors checks the header (8-byte length + JSON) and that the file holds every byte
        the header promises when it opens a file, so a damaged file is caught here, before any
        tensor is read.
        """
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"{path}: empty file (0 bytes): an interrupted download or copy? Fetch it again")
        try:
            return self._safe_open(str(path), "pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError / its own types
            raise ValueError(f"{path}: not a readable safetensors file ({size} bytes; {exc}): truncated or "
                             "corrupted? Fetch it again") from exc

    def keys(self) -> list[str]:
        """All tensor names in the checkpoint."""
        return sorted(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor; KeyError names the missing tensor and the directory."""
        if name not in self.weight_map:
            raise KeyError(f"tensor '{name}' not found in {self.dir}")
        shard = self.weight_map[name]
        try:
            return self._handle(shard).get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for a missing key
            raise ValueError(f"{self.dir / shard}: cannot read '{name}' listed in the index ({exc})") from exc

    def shape(self, name: str) -> tuple:
        """Shape of a tensor without reading its data."""
        try:
            return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())
        except Exception as exc:  # noqa: BLE001 - as in get()
            raise ValueError(f"{self.dir / self.weight_map[name]}: cannot read '{name}' listed in the index "
                             f"({exc})") from exc

    def validate_tensors(self, dims: Qwen3MoeDims) -> None:
        """Raise ValueError unless the checkpoint holds exactly the expected names with the expected shapes."""
        expected = expected_hf_names(dims)
        present = set(self.weight_map)
        if dims.tie_word_embeddings:
            present.discard("lm_head.weight")  # some tied checkpoints store it anyway; it is ignored
        missing, extra = sorted(expected - present), sorted(present - expected)
        if missing:
            raise ValueError(f"{self.dir}: {len(missing)} tensors missing, e.g. {missing[:5]} "
                             "(truncated checkpoint, or config.json does not match the weights?)")
        if extra:
            raise ValueError(f"{self.dir}: {len(extra)} unexpected tensors, e.g. {extra[:5]} "
                             "(not a Qwen3-MoE checkpoint matching config.json?)")
        for name in sorted(expected):
            got, want = self.shape(name), hf_shape(name, dims)
            if got != want:
                raise ValueError(f"{self.dir / self.weight_map[name]}: tensor '{name}' has shape {list(got)}, "
                                 f"config.json implies {list(want)}")


def copy_side_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy config, tokenizer, generation and template files (everything but weights) from src to dst."""
    copied = []
    for p in sorted(Path(src_dir).iterdir()):
        if p.is_file() and p.name not in _SKIP_NAMES and not p.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(p, Path(dst_dir) / p.name)
            copied.append(p.name)
    return copied


class ShardedSafetensorsWriter:
    """Stream ``(name, tensor)`` pairs into safetensors shards of at most ``max_shard_bytes``.

    Shards are written under temporary names and renamed to ``model-0000i-of-0000N.safetensors``
    by :meth:`finalize`, which also writes the index (HF's naming, so SGLang/transformers find them).
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30, copy: bool = True):
        """``copy=False``: keep the caller's tensors instead of cloning them, for a caller whose tensors
        neither change nor get reused before :meth:`finalize` returns (``save_hf_checkpoint``: its
        buckets are fresh or views of parameters the collective export holds still); tensors that
        overlap in memory (safetensors refuses them) are then cloned at the flush."""
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.copy = copy
        self._save_file = require("safetensors.torch", "writing HF checkpoints").save_file
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flushes a shard when adding it would exceed the size limit."""
        if name in self._seen:
            raise ValueError(f"tensor '{name}' written twice")
        self._seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # clone (copy=True): the caller may reuse buffers, and safetensors refuses overlapping storage.
        # Without it the export skips a copy of every tensor (~9 of ~40 ms per export of the 13 MB
        # CPU addition model, issue 15; at scale a shard's worth of host memory)
        t = tensor.detach().to("cpu").contiguous()
        self._pending[name] = t.clone() if self.copy else t
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_all(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Queue every pair of ``pairs``."""
        for name, tensor in pairs:
            self.add(name, tensor)

    def _flush(self) -> None:
        tmp = f".shard-{len(self._shards):05d}.tmp"
        try:
            self._save_file(self._pending, str(self.out_dir / tmp), metadata={"format": "pt"})
        except RuntimeError as exc:  # copy=False and two tensors overlap (e.g. tied weights): copy them
            if self.copy or "share memory" not in str(exc):
                raise
            self._pending = {k: t.clone() for k, t in self._pending.items()}
            self._save_file(self._pending, str(self.out_dir / tmp), metadata={"format": "pt"})
        self._shards.append((tmp, sorted(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finalize(self) -> list[str]:
        """Write the last shard, rename all shards and write the index; returns the shard file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names, weight_map = [], {}
        for i, (tmp, keys) in enumerate(self._shards):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / tmp, self.out_dir / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


def iter_hf_state(reader: HFCheckpointReader,
                  names: Optional[Iterable[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for ``names`` (default: all) one at a time."""
    for name in names if names is not None else reader.keys():
        yield name, reader.get(name)


# ----------------------------------------------------------------------------- HF export
def save_hf_checkpoint(model: Any, hf_cfg: Any, out_dir: str | os.PathLike, *, source_dir: Optional[str] = None,
                       dtype: Optional[torch.dtype | str] = None, max_shard_bytes: int = 5 * 2**30,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       verify_fn: Optional[Callable[[Path], None]] = None) -> Path:
    """Write the live (possibly TP/EP/PP-sharded) model as a Hugging Face directory at ``out_dir``.

    Collective: every rank calls it; rank 0 writes. Output: safetensors shards of at most
    ``max_shard_bytes`` + ``model.safetensors.index.json`` with per-expert names
    (``mlp.experts.{e}.{gate,up,down}_proj.weight``, what SGLang and transformers load), config.json
    and tokenizer/generation files copied from ``source_dir`` (else config.json from ``hf_cfg``).
    ``dtype`` defaults to the config's dtype; ``"fp8"`` / ``fp8.blockwise.BlockFP8Format`` writes
    block-FP8 linear weights with ``weight_scale_inv`` and a ``quantization_config`` (the rest in
    bfloat16, or the model's 16-bit dtype). The directory appears only when complete;
    ``verify_fn(tmp_dir)`` (every rank) may reject it before the rename.
    """
    from megatron_vespo.fp8.blockwise import as_block_fp8

    cfg = read_hf_config(source_dir) if source_dir is not None else hf_config_dict(hf_cfg)
    dims = Qwen3MoeDims.from_hf_config(cfg, source=str(Path(source_dir) / "config.json") if source_dir else "hf_cfg")
    model_dtype = next(unwrap_model(model).parameters()).dtype
    fp8 = as_block_fp8(dtype)  # block FP8 linear weights + quantization_config (fp8/blockwise.py)
    if fp8 is not None:
        dtype = fp8.dtype or (torch.bfloat16 if model_dtype == torch.float32 else model_dtype)
        fp8 = type(fp8)(block=fp8.block, dtype=dtype)
    dtype = parse_dtype(dtype) or config_dtype(cfg) or model_dtype
    dist.check_output_dir(out_dir)
    with dist.dist_atomic_dir(out_dir) as tmp:
        # copy=False: the buckets are fresh tensors or views of parameters that hold still until we return
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes, copy=False) if dist.rank() == 0 else None
        for bucket in iter_hf_weights(model, dims, bucket_bytes=bucket_bytes, dtype=fp8 or dtype, dst=0):
            if writer is not None:
                writer.add_all(bucket)
        if writer is not None:
            shards = writer.finalize()
            if source_dir is not None:
                copy_side_files(source_dir, tmp)
            quant_changed = cfg.get("quantization_config") != (fp8.config() if fp8 is not None else None)
            if fp8 is not None:
                cfg["quantization_config"] = fp8.config()
            else:
                cfg.pop("quantization_config", None)  # the weights written are not quantised
            if _normalize_config(cfg, dtype) or source_dir is None or quant_changed:
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
            logger.info("wrote %d HF shard(s), %.1f MB, dtype %s to %s", len(shards), writer.total_bytes / 1e6,
                        dtype_name(dtype), out_dir)
        dist.barrier()
        if verify_fn is not None:
            verify_fn(tmp)
    return Path(out_dir)


def _normalize_config(cfg: dict, dtype: torch.dtype) -> bool:
    """Make ``cfg`` describe the written weights for every loader; True when it changed.

    * the declared dtype must be the dtype of the safetensors we write;
    * transformers 5 saves the expert count as ``num_local_experts`` only, which transformers 4.x
      (hence SGLang / vLLM images pinned to it) ignores, silently defaulting ``num_experts`` to 128.
    """
    changed = False
    if config_dtype(cfg) != dtype:
        for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            cfg[key] = dtype_name(dtype)
        changed = True
    if "num_experts" not in cfg and "num_local_experts" in cfg:
        cfg["num_experts"] = cfg["num_local_experts"]
        changed = True
    return changed
