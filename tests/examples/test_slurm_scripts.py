"""The Slurm scripts run under fake `srun`/`scontrol` shims: check the commands they build.

The trainer command each script would start is captured and its `--set` overrides are fed to
`megatron-vespo config`, so a script and the config schema cannot drift apart.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "examples" / "slurm"

SRUN = """#!/bin/bash
# fake srun: record the command shell-quoted (shlex.split gives back the exact argv) and exit
printf '%q ' "$@" >> "$FAKE_LOG"
echo >> "$FAKE_LOG"
"""
SCONTROL = """#!/bin/bash
printf 'node1\\nnode2\\nnode3\\n'
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    knobs = ("MASTER_PORT", "CONFIG", "HF_MODEL", "ROLLOUT_NODES", "ENGINES_PER_NODE", "ROLLOUT_TP", "EXTRA_ARGS",
             "OUTPUT_DIR", "GPUS_PER_NODE", "SGLANG_PORT", "TP", "EP", "PP", "NPROC", "OUT", "VERIFY")
    env = {k: v for k, v in os.environ.items() if k not in knobs}
    env = {**env, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FAKE_LOG": str(tmp_path / "srun.log"), "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_JOB_ID": "42"}
    return env, tmp_path


@pytest.mark.parametrize("script", sorted(SLURM.glob("*.sbatch")), ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_train_script_builds_engines_and_a_valid_trainer_command(fake_slurm):
    env, tmp = fake_slurm
    env.update(ROLLOUT_NODES="1", ENGINES_PER_NODE="2", ROLLOUT_TP="4")
    proc = subprocess.run(["bash", str(SLURM / "train_qwen3_30b_a3b.sbatch")], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp / "srun.log").read_text().splitlines()
    engines = [" ".join(shlex.split(ln)) for ln in lines if "sglang.launch_server" in ln]
    assert len(engines) == 2
    # the engine steps start in the background: their log order is a race, their port -> GPU mapping is not
    engines.sort(key=lambda e: int(e.split("--port ")[1].split()[0]))
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in engines[0] and "--port 30000" in engines[0]
    assert "CUDA_VISIBLE_DEVICES=4,5,6,7" in engines[1] and "--port 30010" in engines[1]
    assert all("--enable-return-routed-experts" in e and "--nodelist node1" in e for e in engines)
    trainer = [ln for ln in lines if "megatron_vespo.cli train" in ln]
    assert len(trainer) == 1
    args = shlex.split(trainer[0])
    assert args[args.index("--nnodes") + 1] == "2" and "node2:29500" in trainer[0]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert 'rollout.urls=["http://node1:30000","http://node1:30010"]' in overrides
    config = args[args.index("train") + 1]
    cmd = [sys.executable, "-m", "megatron_vespo.cli", "config", str(ROOT / config)]
    for o in overrides:
        cmd += ["--set", o]
    check = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert "http://node1:30010" in check.stdout


def test_train_script_refuses_too_few_nodes(fake_slurm):
    env, tmp = fake_slurm
    env["ROLLOUT_NODES"] = "3"
    proc = subprocess.run(["bash", str(SLURM / "train_qwen3_30b_a3b.sbatch")], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "ROLLOUT_NODES=3" in proc.stderr


def test_convert_script_builds_the_convert_command(fake_slurm):
    env, tmp = fake_slurm
    env.update(HF_DIR="/models/hf", OUT="/ckpt/out", TP="2", EP="4", VERIFY="1")
    proc = subprocess.run(["bash", str(SLURM / "convert_checkpoint.sbatch")], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    (line,) = (tmp / "srun.log").read_text().splitlines()
    args = shlex.split(line)
    assert args[args.index("--nproc-per-node") + 1] == "4"  # lcm(TP=2, EP=4)
    tail = args[args.index("convert"):]
    assert tail[:2] == ["convert", "hf-to-mcore"] and "--verify" in tail
    # the arguments parse with the real CLI
    from megatron_vespo.cli import build_parser

    ns = build_parser().parse_args(tail)
    assert (ns.tp, ns.ep, ns.hf_dir, ns.out) == (2, 4, "/models/hf", "/ckpt/out")
