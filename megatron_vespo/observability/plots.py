"""PNG curves of a run's ``metrics.jsonl`` (reward, W / phi / ESS, KL, grad norm).

matplotlib renders them (the library users already have); it is imported only here, so the
rest of the package does not need it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from megatron_vespo.observability.metrics import read_metrics

logger = logging.getLogger(__name__)

#: (title, metric keys) of each panel; keys missing from a run are skipped
DEFAULT_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward (per rollout)", ("rollout/reward_mean",)),
    ("sequence IS weight W (log scale)", ("loss/vespo/w_mean", "loss/vespo/w_max", "loss/vespo/w_min")),
    ("VESPO phi(W) and ESS", ("loss/vespo/phi_mean", "loss/vespo/ess")),
    ("KL to old policy / entropy", ("kl_old", "entropy")),
    ("grad norm", ("grad_norm",)),
    ("loss", ("loss",)),
)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_runs(runs: Sequence[str | os.PathLike], out_png: str | os.PathLike,
              panels: Sequence[tuple[str, Sequence[str]]] = DEFAULT_PANELS) -> Path:
    """Plot one or more runs (directories holding ``metrics.jsonl``, or the files) into ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    loaded = []
    for run in runs:
        path = Path(run)
        path = path / "metrics.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no metrics.jsonl (pass a run's loop.output_dir)")
        loaded.append((path.parent.name, read_metrics(path)))
    shown = [(t, keys) for t, keys in panels if any(_series(rows, k)[0] for _, rows in loaded for k in keys)]
    if not shown:
        raise ValueError(f"none of the plotted metrics occur in {', '.join(map(str, runs))}")
    cols = 2
    nrows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, shown):
        for name, rows in loaded:
            for key in keys:
                xs, ys = _series(rows, key)
                if xs:
                    label = key if len(loaded) == 1 else f"{name}: {key}"
                    ax.plot(xs, ys, label=label, linewidth=1.2)
        if "log scale" in title:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("optimizer update")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    logger.info("wrote %s", out_png)
    return out_png
