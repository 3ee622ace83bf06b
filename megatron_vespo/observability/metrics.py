"""Metrics sinks: a JSONL file always, wandb (offline by default) when enabled.

Each ``log`` call writes one JSON object per line with the step, so a crashed run keeps
every line it flushed. wandb is the library users already read curves in; it is imported
only when enabled.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

from megatron_vespo.observability.config import LoggingConfig
from megatron_vespo.utils.io import atomic_path

logger = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    """Floats stay floats (NaN/inf become strings JSON can hold); tensors become python numbers."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Write metrics to ``<output_dir>/metrics.jsonl`` and optionally to wandb.

    Only rank 0 should construct one with ``enabled=True``; other ranks pass ``enabled=False``
    and every call becomes a no-op.

    ``start_step`` tells what an existing file means: None appends to it; 0 (a fresh run) moves
    it aside to ``metrics.<k>.jsonl`` so runs never mix; S > 0 (a run resumed at step S) keeps
    its whole rows with ``step <= S`` and drops the rest (logged after the checkpoint, or a line
    torn by a kill), so the resumed run continues the curve without duplicates.
    """

    def __init__(self, output_dir: str | os.PathLike, cfg: LoggingConfig | None = None,
                 enabled: bool = True, config_dump: Mapping[str, Any] | None = None,
                 start_step: int | None = None) -> None:
        self.enabled = enabled
        self.cfg = cfg or LoggingConfig()
        self.path = Path(output_dir) / "metrics.jsonl"
        self._wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step is not None and self.path.exists():
            self._reconcile(start_step)
        self._fh = self.path.open("a", buffering=1)
        if self.cfg.wandb and self.cfg.wandb_mode != "disabled":
            from megatron_vespo.utils.imports import require

            wandb = require("wandb", "metrics logging to wandb")
            self._wandb_run = wandb.init(project=self.cfg.wandb_project, name=self.cfg.run_name,
                                         mode=self.cfg.wandb_mode, dir=str(self.path.parent),
                                         config=dict(config_dump or {}))

    def _reconcile(self, start_step: int) -> None:
        """Move a previous run's file aside (fresh start) or cut it back to ``start_step`` (resume)."""
        if start_step == 0:
            k = 1
            while (aside := self.path.with_name(f"metrics.{k}.jsonl")).exists():
                k += 1
            self.path.rename(aside)
            logger.warning("%s held an earlier run's metrics: moved to %s", self.path, aside.name)
            return
        kept, dropped = [], 0
        with self.path.open() as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                elif line.strip():
                    dropped += 1
        if dropped:
            with atomic_path(self.path) as out:
                out.writelines(kept)
            logger.info("%s: dropped %d row(s) logged after the resumed step %d", self.path, dropped, start_step)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record ``metrics`` at ``step``."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        """Flush and close the sinks."""
        if not self.enabled:
            return
        self._fh.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file back (for plots and tests)."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
