"""Helpers of the kill-and-resume tests: run ``megatron-vespo train`` as a user does, kill it at a named
point (``MEGATRON_VESPO_FAULT``, see ``megatron_vespo.checkpoint.faults``), and compare metrics rows.

Every child gets a unique ``MV_FAULT_TEST_TAG`` in its environment, inherited by whatever it
starts (engine processes, Ray); after a kill -9 those are found through ``/proc/*/environ`` and
ended (they are ours), so a killed run never leaks into the next one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from _dist import tagged_pids

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny_cpu_vespo.yaml"

#: metrics that measure time, or the rollout engine's numerics under its dynamic batching (how many
#: requests share a forward depends on arrival times, so the engine's log-probs -- not the sampled
#: tokens -- differ in the last bits between two uninterrupted runs too); everything else must match
VOLATILE_PREFIXES = ("time/", "mismatch/")
VOLATILE_SUFFIXES = ("_s", "tokens_per_s")


def comparable(row: dict) -> dict:
    """``row`` without the volatile keys (see ``VOLATILE_*``)."""
    return {k: v for k, v in row.items() if not (k.startswith(VOLATILE_PREFIXES) or k.endswith(VOLATILE_SUFFIXES))}


def read_rows(out: Path) -> list[dict]:
    """Rows of ``out/metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _tagged_pids(tag: str) -> list[int]:
    return tagged_pids("MV_FAULT_TEST_TAG", tag)


def _end_tagged(tag: str) -> None:
    for pid in _tagged_pids(tag):  # processes carrying this run's unique tag: started by this test
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    deadline = time.time() + 10
    while _tagged_pids(tag) and time.time() < deadline:
        time.sleep(0.2)


def train(out: Path, ckpt: Path, *overrides: str, fault: Optional[str] = None, mode: str = "sync",
          timeout: float = 900) -> subprocess.CompletedProcess:
    """One ``megatron-vespo train`` of the tiny config; with ``fault`` the run must die by SIGKILL there."""
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "train", str(TINY), "--set", f"loop.output_dir={out}",
           "--set", f"checkpoint.save_dir={ckpt}", "--set", f"loop.mode={mode}"]
    for o in overrides:
        cmd += ["--set", o]
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("MEGATRON_VESPO_FAULT", "RAY_ADDRESS")}
    env.update(MV_FAULT_TEST_TAG=tag, OMP_NUM_THREADS="1")
    if fault:
        env["MEGATRON_VESPO_FAULT"] = fault
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=out.parent, env=env)
    finally:
        _end_tagged(tag)
    if fault:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
        assert f"reached {fault.split('@')[0]}" in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def checkpoint_files(it_dir: Path) -> dict[str, bytes]:
    """Every file of a checkpoint iteration except dist_checkpointing's ``.metadata`` (it holds a random id)."""
    return {str(p.relative_to(it_dir)): p.read_bytes() for p in sorted(it_dir.rglob("*"))
            if p.is_file() and p.name != ".metadata"}
