"""The RL loop with ``weight_sync.kind=distributed`` vs ``disk``: `megatron-vespo train`, tiny CPU config, 2 rollouts.

Both paths put the same bits into the engine, so the two runs (same seeds) must produce the same
rewards and losses, number for number. With the broadcast path the engine starts from the
initial export (``weights/v000000``) and no later version directory is written. The runs are
started together (each is mostly process start-up on CPU). ``weight_sync.kind=tensor`` passes
the same comparison (checked by hand; left out to keep the suite short): the in-process suite
in ``test_distributed.py`` covers its bits.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vespo.observability import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny_cpu_vespo.yaml"
KINDS = ("disk", "distributed")
pytestmark = pytest.mark.e2e


def test_distributed_weight_sync_run_matches_disk_run(tmp_path):
    procs = {}
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # each run is its own job
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "OMP_NUM_THREADS": "1"}
    for kind in KINDS:
        cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(TINY), "--set",
               f"loop.output_dir={tmp_path / kind}", "--set", "loop.num_rollouts=2", "--set",
               f"weight_sync.kind={kind}", "--set", "weight_sync.bucket_mb=0.25"]
        log = open(tmp_path / f"{kind}.log", "w")  # a file, not a pipe: nobody reads while they run
        procs[kind] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                        env=env), log)
    for kind, (proc, log) in procs.items():
        proc.wait(timeout=600)
        log.close()
        assert proc.returncode == 0, f"{kind}: {(tmp_path / f'{kind}.log').read_text()[-4000:]}"
    rows = {k: read_metrics(tmp_path / k / "metrics.jsonl") for k in KINDS}
    trajectory = {k: [(r.get("rollout/reward_mean"), r.get("loss")) for r in rows[k]] for k in KINDS}
    assert len(trajectory["disk"]) == 10  # 2 x (4 updates + 1 rollout row)
    assert trajectory["distributed"] == trajectory["disk"]
    dist = [r for r in rows["distributed"] if "rollout" in r]
    assert [r["policy_version"] for r in dist] == [1.0, 2.0]
    assert all(r["weight_sync/bytes"] > 0 and r["weight_sync/buckets"] > 1 for r in dist)
    assert dist[0]["weight_sync/connect_s"] > 0 and dist[1]["weight_sync/connect_s"] == 0  # group made once
    assert sorted(p.name for p in (tmp_path / "distributed" / "weights").iterdir()) == ["v000000"]
    assert sorted(p.name for p in (tmp_path / "disk" / "weights").iterdir()) == ["v000001", "v000002"]
