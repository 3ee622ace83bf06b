"""The loss benchmark: CLI subcommand, tools/ wrapper and JSON report (tiny sizes only)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_vespo.cli import main as cli_main
from megatron_vespo.losses import available_losses
from megatron_vespo.losses.bench import bench_losses, format_table, parse_sizes

ROOT = Path(__file__).resolve().parents[2]


def test_parse_sizes():
    assert parse_sizes("256x1024, 1024X8192") == [(256, 1024), (1024, 8192)]
    for bad, match in [("256", "must look like BxT"), ("0x5", "positive"), (",", "empty")]:
        with pytest.raises(ValueError, match=match):
            parse_sizes(bad)


def test_bench_reports_every_loss_relative_to_grpo():
    results = bench_losses(["vespo"], sizes=[(4, 8)], repeats=2, warmup=0)
    assert [r.loss for r in results] == ["grpo", "vespo"]  # grpo added as the baseline
    assert results[0].ratio_to_grpo == 1.0 and results[1].median_ms > 0
    table = format_table(results)
    assert "B=4 T=8" in table and table.splitlines()[3].startswith("vespo")
    with pytest.raises(ValueError, match="unknown loss"):
        bench_losses(["nope"], sizes=[(4, 8)])


def test_cli_subcommand_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli_main(["bench-losses", "--sizes", "4x8", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert {r["loss"] for r in report["results"]} == set(available_losses())
    assert report["machine"]["torch"] and report["date"]
    for name in available_losses():
        assert name in printed
    assert cli_main(["bench-losses", "--sizes", "4y8"]) == 2


def test_tools_wrapper_runs_the_same_benchmark(capsys):
    spec = importlib.util.spec_from_file_location("bench_tool", ROOT / "tools" / "bench_losses.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--sizes", "4x8", "--losses", "vespo,gpg", "--repeats", "1", "--warmup", "0"]) == 0
    printed = capsys.readouterr().out
    assert "vespo" in printed and "gpg" in printed and "grpo" in printed and "sapo" not in printed
