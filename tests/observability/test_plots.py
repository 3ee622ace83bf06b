"""`megatron-vespo plot` writes a PNG of a run's curves; bad inputs name the file."""

import json

import pytest

pytest.importorskip("matplotlib")

from megatron_vespo.cli import main  # noqa: E402
from megatron_vespo.observability.plots import plot_runs  # noqa: E402


def _run(tmp_path, name, rows):
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_plot_two_runs(tmp_path):
    a = _run(tmp_path, "vespo", [{"step": i, "loss": 0.1 * i, "loss/vespo/w_mean": 1.0 + 0.01 * i,
                                  "grad_norm": 1.0} for i in range(1, 9)] + [{"step": 8, "rollout/reward_mean": 0.5}])
    b = _run(tmp_path, "grpo", [{"step": i, "loss": -0.1 * i, "bad": "nan"} for i in range(1, 9)])
    out = plot_runs([a, b / "metrics.jsonl"], tmp_path / "p" / "curves.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert main(["plot", str(a), "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 10_000


def test_plot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")
    empty = _run(tmp_path, "empty", [{"step": 1, "other": 1.0}])
    with pytest.raises(ValueError, match="none of the plotted metrics"):
        plot_runs([empty], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
