"""tools/bench_pipeline.py's run order and bracketed ratios (pure functions; nothing is run)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "bench_pipeline", Path(__file__).resolve().parents[1] / "tools" / "bench_pipeline.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SYSTEMS = ["ours_sync_n1", "ours_sync_n4", "ours_async", "trl"]


def test_default_schedule_runs_every_system_once_per_round_rotating():
    runs = bench.schedule(SYSTEMS, 3, bracket=False)
    assert len(runs) == 12
    assert [s for r, s in runs if r == 0] == SYSTEMS
    assert [s for r, s in runs if r == 1] == SYSTEMS[1:] + SYSTEMS[:1]


def test_bracketed_schedule_puts_a_trl_run_on_both_sides_of_each_of_ours():
    runs = bench.schedule(SYSTEMS, 2, bracket=True)
    names = [s for _, s in runs]
    assert names[0] == names[-1] == "trl" and len(names) == 1 + 2 * 2 * 3
    assert names.count("ours_async") == 2 and names.count("trl") == 7
    for i, name in enumerate(names):
        if name != "trl":
            assert names[i - 1] == names[i + 1] == "trl"
    assert [s for r, s in runs if r == 1 and s != "trl"] == ["ours_sync_n4", "ours_async", "ours_sync_n1"]
    assert bench.schedule(["ours_async"], 2, bracket=True) == [(0, "ours_async"), (1, "ours_async")]  # no TRL


def test_each_run_is_compared_with_the_mean_of_its_two_trl_neighbours():
    runs = bench.schedule(["ours_async", "trl"], 2, bracket=True)  # trl, a, trl, a, trl
    rates = [100.0, 150.0, 200.0, 300.0, 100.0]
    assert bench.bracket_ratios(runs, rates) == {"ours_async": [1.0, 2.0]}
    assert bench.bracket_ratios(bench.schedule(SYSTEMS, 1, bracket=False), [1.0] * 4) == {}
