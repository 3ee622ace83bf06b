"""Shared helpers of the plan tests: shipped configs pointed at the config.json-only test directory."""

from __future__ import annotations

import copy
from pathlib import Path

from megatron_vespo.config.base import load_yaml, validate
from megatron_vespo.config.job import JobConfig
from megatron_vespo.plan.hf_index import read_index

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
CONFIG_30B = DATA / "qwen3_30b_a3b"  # the published config.json only: no weights, no tokenizer
INDEX_30B = DATA / "qwen3_30b_a3b_tensor_index.json.gz"
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
# a config meant for larger GPUs says so in its file name; every other one is planned for 80 GB
TARGET_GPU_GIB = {"h200": 141, "b200": 192, "gb200": 192}


def target_gpu_gib(path: Path) -> int:
    """GPU memory a shipped config is meant for (80 GiB unless its name says h200/b200)."""
    return next((g for key, g in TARGET_GPU_GIB.items() if key in path.stem.lower()), 80)


def is_qwen3_30b(data: dict) -> bool:
    """True when the job's model is Qwen3-30B-A3B (by checkpoint path or preset)."""
    m = data.get("model") or {}
    return "30b-a3b" in str(m.get("hf_path") or m.get("preset") or "").lower()


def job_from(data: dict) -> JobConfig:
    """Validate a job dict; a Qwen3-30B-A3B ``model.hf_path`` is pointed at the test config.json directory."""
    data = copy.deepcopy(data)
    if is_qwen3_30b(data) and (data.get("model") or {}).get("hf_path"):
        data["model"]["hf_path"] = str(CONFIG_30B)
    return validate(JobConfig, data)


def shipped_job(path: Path) -> tuple[dict, JobConfig]:
    """(raw YAML dict, validated job) of a shipped config.

    A config whose ``model.hf_path`` is a checkpoint made by a repo tool (not stored in the repo,
    e.g. ``outputs/...``) cannot be planned before that tool ran: the test is skipped saying so.
    """
    data = load_yaml(path)
    hf_path = (data.get("model") or {}).get("hf_path")
    if hf_path and not is_qwen3_30b(data) and not (ROOT / hf_path).joinpath("config.json").is_file() \
            and not Path(hf_path).joinpath("config.json").is_file():
        import pytest

        pytest.skip(f"{path.name}: model.hf_path {hf_path} has no config.json in this checkout (a checkpoint a "
                    "tool prepares); plan it after preparing it")
    if hf_path and not is_qwen3_30b(data) and (ROOT / hf_path).is_dir():
        data["model"]["hf_path"] = str(ROOT / hf_path)
    return data, job_from(data)


def index_30b() -> dict:
    """The published checkpoint's tensor index shipped as test data."""
    return read_index(INDEX_30B)


def ep8_job_dict(**train: object) -> dict:
    """A TP4/SP + EP8 Qwen3-30B-A3B job on one 8-GPU node, no memory-saving options."""
    return {
        "model": {"hf_path": str(CONFIG_30B), "preset": None, "params_dtype": "bfloat16"},
        "parallel": {"tensor_model_parallel_size": 4, "sequence_parallel": True, "expert_model_parallel_size": 8,
                     "expert_tensor_parallel_size": 1},
        "train": {"rollout_batch_size": 512, "mini_batch_size": 64, "micro_batch_size": 1, **train},
        "routing": {"mode": "R3"},
        "rollout": {"engine": "sglang", "n_samples_per_prompt": 8, "return_routed_experts": True, "tp_size": 4,
                    "sampling": {"max_new_tokens": 8192}},
        "data": {"max_prompt_len": 1024},
        "loop": {"weight_sync": "distributed"},
    }
