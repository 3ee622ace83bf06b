"""Forward + backward timing of every registered loss, relative to GRPO in the same run.

Used by ``megatron-vespo bench-losses`` and ``tools/bench_losses.py``. For each size
(B rows x T tokens) the inputs are built once; each repeat then times every loss in turn
(interleaved, so drift from other processes hits all losses alike) as
``compute_policy_loss(...)`` + ``loss.backward()`` including input validation and metrics,
i.e. what the trainer pays. The median over repeats is reported with its ratio to GRPO's.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from megatron_vespo.losses.registry import available_losses, compute_policy_loss

logger = logging.getLogger(__name__)

FULL_SIZES: tuple[tuple[int, int], ...] = ((256, 1024), (256, 8192), (1024, 1024), (1024, 8192))
QUICK_SIZES: tuple[tuple[int, int], ...] = ((16, 128), (64, 512))
GROUP_SIZE = 8


@dataclass
class BenchResult:
    """Timing of one loss at one size (milliseconds)."""

    loss: str
    batch: int
    tokens: int
    median_ms: float
    min_ms: float
    ratio_to_grpo: Optional[float] = None


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Parse ``"256x1024,1024x8192"`` into [(256, 1024), (1024, 8192)]; ValueError naming the bad item."""
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            b, t = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--sizes item {item!r} must look like BxT, e.g. 256x1024") from None
        if b < 1 or t < 1:
            raise ValueError(f"--sizes item {item!r} must have positive B and T")
        sizes.append((b, t))
    if not sizes:
        raise ValueError("--sizes is empty")
    return sizes


def make_inputs(batch: int, tokens: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Realistic-looking loss inputs: lengths in [T/2, T], small log-ratios, groups of 8, GRPO advantages."""
    gen = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(batch, tokens, generator=gen, dtype=dtype) * 2.0
    old = log_prob + 0.05 * torch.randn(batch, tokens, generator=gen, dtype=dtype)
    lengths = torch.randint(max(tokens // 2, 1), tokens + 1, (batch,), generator=gen)
    mask = torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(batch, generator=gen, dtype=dtype)
    group_index = torch.arange(batch) // GROUP_SIZE
    return dict(log_prob=log_prob.requires_grad_(True), old_log_prob=old, advantages=adv, response_mask=mask,
                group_index=group_index)


def _time_once(name: str, inputs: dict) -> float:
    inputs["log_prob"].grad = None
    start = time.perf_counter()
    loss, _ = compute_policy_loss(name, **inputs)
    loss.backward()
    return (time.perf_counter() - start) * 1e3


def bench_losses(
    names: Optional[Sequence[str]] = None,
    sizes: Sequence[tuple[int, int]] = FULL_SIZES,
    repeats: int = 5,
    warmup: int = 2,
    dtype: torch.dtype = torch.float32,
) -> list[BenchResult]:
    """Time every loss in ``names`` (default: all registered; grpo is always included as the baseline)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} / {warmup}")
    names = list(names) if names else available_losses()
    unknown = sorted(set(names) - set(available_losses()))
    if unknown:
        raise ValueError(f"unknown loss(es) {', '.join(unknown)}; available: {', '.join(available_losses())}")
    if "grpo" not in names:
        names.insert(0, "grpo")
    results: list[BenchResult] = []
    for batch, tokens in sizes:
        inputs = make_inputs(batch, tokens, dtype)
        for _ in range(warmup):
            for name in names:
                _time_once(name, inputs)
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:
                times[name].append(_time_once(name, inputs))
        base = statistics.median(times["grpo"])
        for name in names:
            med = statistics.median(times[name])
            results.append(BenchResult(name, batch, tokens, med, min(times[name]), med / base))
        logger.info("B=%d T=%d: vespo/grpo = %.3f", batch, tokens,
                    statistics.median(times.get("vespo", times["grpo"])) / base)
        del inputs
    return results


def machine_info() -> dict:
    """Where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def to_json(results: Sequence[BenchResult], **extra) -> dict:
    """JSON-ready report: date, machine and one row per (loss, size)."""
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
            **extra, "results": [asdict(r) for r in results]}


def format_table(results: Sequence[BenchResult]) -> str:
    """Plain-text table: one row per loss, one column pair (ms, x grpo) per size."""
    sizes = list(dict.fromkeys((r.batch, r.tokens) for r in results))
    names = list(dict.fromkeys(r.loss for r in results))
    cell = {(r.loss, r.batch, r.tokens): r for r in results}
    head = ["loss".ljust(8)] + [f"B={b} T={t}".rjust(24) for b, t in sizes]
    lines = [" ".join(head), " ".join(["".ljust(8)] + ["median ms   x grpo".rjust(24)] * len(sizes))]
    for name in names:
        row = [name.ljust(8)]
        for b, t in sizes:
            r = cell.get((name, b, t))
            row.append((f"{r.median_ms:11.2f} {r.ratio_to_grpo:8.3f}" if r else "-").rjust(24))
        lines.append(" ".join(row))
    return "\n".join(lines) + "\n"
