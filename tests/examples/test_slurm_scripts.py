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
# fake srun: record the command shell-quoted (shlex.split gives back the exact argv) and the environment
# a real step would inherit, then behave like the step: the YAML helper really runs, an SGLang server
# keeps running until stopped (or dies after FAKE_ENGINE_EXIT is set), the trainer runs FAKE_TRAIN_S s
printf '%q ' "$@" >> "$FAKE_LOG"
echo >> "$FAKE_LOG"
echo "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-}\
 GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-}" >> "$FAKE_LOG.env"
case "$*" in
  *megatron_vespo.orchestration.slurm_env*)
    while [[ "$1" != python ]]; do shift; done
    exec "$@";;
  *sglang.launch_server*)
    if [[ -n "${FAKE_ENGINE_EXIT:-}" ]]; then sleep 0.5; exit "$FAKE_ENGINE_EXIT"; fi
    exec sleep 300;;
  *"megatron_vespo.cli train"*)
    exec sleep "${FAKE_TRAIN_S:-0}";;
esac
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
             "OUTPUT_DIR", "GPUS_PER_NODE", "SGLANG_PORT", "TP", "EP", "PP", "NPROC", "OUT", "VERIFY",
             "CONTAINER_IMAGE", "CONTAINER_MOUNTS", "SOCKET_IFNAME", "HEAD_IP", "DRY_RUN", "CPUS_PER_TASK",
             "SLURM_CPUS_PER_TASK", "LIVENESS_INTERVAL", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
             "CUDA_DEVICE_MAX_CONNECTIONS")
    env = {k: v for k, v in os.environ.items() if k not in knobs}
    env = {**env, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "FAKE_LOG": str(tmp_path / "srun.log"), "SLURM_JOB_NODELIST": "node[1-3]", "SLURM_JOB_ID": "42",
           "CONFIG": str(ROOT / "examples" / "configs" / "qwen3_30b_a3b_vespo_ep8.yaml"), "LIVENESS_INTERVAL": "0.2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return env, tmp_path


def _run(script, env, tmp, timeout=120):
    return subprocess.run(["bash", str(SLURM / script)], env=env, cwd=tmp, capture_output=True, text=True,
                          timeout=timeout)


def _srun_lines(tmp):
    return [shlex.split(ln) for ln in (tmp / "srun.log").read_text().splitlines()]


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
    # the YAML's rollout.server_args and tp_size reach the engines
    assert all("--mem-fraction-static 0.7" in e and "--tp-size 4" in e for e in engines)
    envs = (tmp / "srun.log.env").read_text().splitlines()
    assert envs and all("CUDA_DEVICE_MAX_CONNECTIONS=1" in e for e in envs)
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


def test_train_script_container_network_and_yaml_overrides(fake_slurm):
    env, tmp = fake_slurm
    env.update(CONTAINER_IMAGE="/images/mv.sqsh", CONTAINER_MOUNTS="/models:/models", SOCKET_IFNAME="ib0",
               HEAD_IP="10.0.0.2", EXTRA_ARGS="--set rollout.server_args.mem_fraction_static=0.6")
    proc = _run("train_qwen3_30b_a3b.sbatch", env, tmp)
    assert proc.returncode == 0, proc.stderr
    lines = _srun_lines(tmp)
    assert len(lines) == 4  # YAML helper, 2 engines, trainer
    for args in lines:  # every step runs in the container
        assert "--container-image=/images/mv.sqsh" in args and "--container-mounts=/models:/models" in args
    engines = [a for a in lines if "sglang.launch_server" in a]
    assert all(a[a.index("--mem-fraction-static") + 1] == "0.6" for a in engines)  # EXTRA_ARGS reach engines too
    (trainer,) = [a for a in lines if "train" in a and "megatron_vespo.cli" in a]
    assert trainer[trainer.index("--rdzv-endpoint") + 1] == "10.0.0.2:29500"
    assert trainer[trainer.index("--cpus-per-task") + 1] == "64"
    envs = (tmp / "srun.log.env").read_text()
    assert "NCCL_SOCKET_IFNAME=ib0" in envs and "GLOO_SOCKET_IFNAME=ib0" in envs


def test_train_script_fails_the_job_when_an_engine_dies(fake_slurm):
    env, tmp = fake_slurm
    env.update(FAKE_ENGINE_EXIT="3", FAKE_TRAIN_S="60")
    proc = _run("train_qwen3_30b_a3b.sbatch", env, tmp, timeout=50)  # the 60 s trainer must not be waited for
    assert proc.returncode == 1
    assert "SGLang engine node1:300" in proc.stderr and "exited while the trainer was running" in proc.stderr


def test_train_script_dry_run_prints_every_step_and_starts_nothing(fake_slurm):
    env, tmp = fake_slurm
    env.update(DRY_RUN="1")
    proc = _run("train_qwen3_30b_a3b.sbatch", env, tmp)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp / "srun.log").exists()  # no srun at all
    out = proc.stdout
    assert "[dry-run] engine on node1 GPUs 0,1,2,3 port 30000" in out
    assert "[dry-run] engine on node1 GPUs 4,5,6,7 port 30010" in out
    assert "[dry-run] trainer on node2,node3, GPUs 0-7 of each, rendezvous node2:29500" in out
    srun_lines = [shlex.split(ln) for ln in out.splitlines() if ln.startswith("  srun")]
    assert len(srun_lines) == 3 and all("--nodelist" in a for a in srun_lines)


def test_train_script_stops_on_a_bad_yaml_before_starting_engines(fake_slurm):
    env, tmp = fake_slurm
    env.update(EXTRA_ARGS="--set train.lr=-1")
    proc = _run("train_qwen3_30b_a3b.sbatch", env, tmp)
    assert proc.returncode != 0 and "train.lr" in proc.stderr
    assert not any("sglang.launch_server" in a for a in _srun_lines(tmp))


def test_convert_script_dry_run_and_container(fake_slurm):
    env, tmp = fake_slurm
    env.update(HF_DIR="/models/hf", OUT="/ckpt/out", TP="4", EP="8", DRY_RUN="1", CONTAINER_IMAGE="img.sqsh")
    proc = _run("convert_checkpoint.sbatch", env, tmp)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp / "srun.log").exists()
    assert "[dry-run] convert on 1 node, GPUs 0-7" in proc.stdout and "--container-image=img.sqsh" in proc.stdout
