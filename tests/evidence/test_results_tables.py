"""docs/results.md's issue-14 tables are generated from the committed cells and agree with them."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "update_results_tables.py"


def _tool():
    spec = importlib.util.spec_from_file_location("update_results_tables", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(loss: str, n: int, seed: int, ev: float) -> dict:
    return {"loss": loss, "n": n, "seed": seed, "mode": "sync", "lag": 0, "eval": ev, "eval_best": ev + 0.1}


def test_render_replaces_only_between_markers(tmp_path, monkeypatch):
    mod = _tool()
    cells = tmp_path / "cells"
    cells.mkdir()
    for i, (loss, n, s, ev) in enumerate([("grpo", 1, 0, 0.4), ("grpo", 1, 1, 0.6), ("vespo", 4, 0, 0.5),
                                          ("cispo", 1, 0, 0.9)]):  # cispo is not an issue-14 loss: left out
        (cells / f"c{i}.json").write_text(json.dumps(_cell(loss, n, s, ev)))
    monkeypatch.setattr(mod, "TABLES", {"t": (str(tmp_path), "eval")})
    monkeypatch.setattr(mod, "ROOT", Path("/"))
    text = "before\n<!-- t -->\nstale\n<!-- /t -->\nafter\n"
    out = mod.render(text)
    assert out.startswith("before\n<!-- t -->\n| loss | N=1 | N=4 |") and out.endswith("<!-- /t -->\nafter\n")
    assert "| vespo | — | 0.500 ± 0.000 (1) |" in out  # losses in the tool's order: vespo before grpo
    assert "| grpo | 0.500 ± 0.141 (2) | — |" in out
    assert "cispo" not in out and "stale" not in out
    assert mod.render(out) == out


def test_results_page_matches_committed_cells():
    res = subprocess.run([sys.executable, str(TOOL), "--check"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, "docs/results.md tables differ from the cells: run tools/update_results_tables.py"
