"""Config of the weight sync to the rollout engines (owned by ``weight_sync/``).

Which path runs is ``weight_sync.kind`` (``disk`` | ``distributed`` | ``tensor``; the old key
``loop.weight_sync`` still works as a deprecated alias); the other fields are the knobs of the
paths. Names follow slime's where one exists (``update_weight_buffer_size`` -> ``bucket_mb``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from megatron_vespo.config.base import Section


class WeightSyncConfig(Section):
    """Weight-sync knobs (one docstring per field below)."""

    kind: Literal["disk", "distributed", "tensor"] = "disk"
    """Path: disk (HF export + engine reload), distributed (broadcast to the engines), tensor (colocated, CUDA IPC)."""
    bucket_mb: float = Field(512, gt=0)
    """HF tensors are exported and sent in buckets of at most this many MiB (one HTTP call + broadcast per bucket;
    slime's update_weight_buffer_size)."""
    dtype: Optional[Literal["float32", "bfloat16", "float16", "fp8"]] = None
    """Cast on export (default: the model's dtype; bfloat16 when the trainer keeps fp32 weights and the engine serves
    bf16); fp8 sends block-FP8 linear weights (float8_e4m3fn + float32 weight_scale_inv per fp8_block_size block,
    the rest bfloat16) to an FP8 engine (docs/fp8.md)."""
    fp8_block_size: tuple[int, int] = (128, 128)
    """Block of the FP8 scales, [block_n, block_k] (SGLang's weight_block_size) for dtype fp8."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend of the distributed path; auto = nccl with CUDA, gloo without."""
    master_address: Optional[str] = None
    """Where training rank 0 listens for the engines (default: 127.0.0.1 when every engine is local, else this host's
    address)."""
    master_port: int = Field(0, ge=0, le=65535)
    """Port of master_address; 0 = a free one."""
    group_name: str = Field("weight_update_group", min_length=1)
    """Name of the weight-update process group registered with the engines."""
    flattened_bucket: bool = True
    """Send each bucket as one flat uint8 tensor (SGLang's load_format=flattened_bucket: one broadcast per bucket, not
    per tensor); off only for servers that predate it."""
    init_timeout_s: float = Field(300.0, gt=0)
    """Bound on the process-group rendezvous, seconds."""
    op_timeout_s: float = Field(600.0, gt=0)
    """Bound on every broadcast, seconds."""
    keep_last: int = Field(2, ge=1)
    """Exported versions kept on disk by the disk path."""

    @field_validator("fp8_block_size")
    @classmethod
    def _positive_block(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError(f"weight_sync.fp8_block_size must be two positive ints [block_n, block_k], got {list(v)}")
        return v

    @property
    def export_dtype(self) -> Any:
        """What the export casts to: ``dtype``, or a ``BlockFP8Format`` when ``dtype: fp8``."""
        if self.dtype != "fp8":
            return self.dtype
        from megatron_vespo.fp8.blockwise import BlockFP8Format

        return BlockFP8Format(block=tuple(self.fp8_block_size))

    @property
    def bucket_bytes(self) -> int:
        """``bucket_mb`` in bytes."""
        return max(1, int(self.bucket_mb * 2**20))
