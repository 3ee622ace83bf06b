"""Layouts that cannot work are refused before launch, with the field to change."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from _jobs import CONFIG_30B, INDEX_30B, ep8_job_dict, job_from

from megatron_vespo.cli import main
from megatron_vespo.config.base import ConfigError
from megatron_vespo.plan.hf_index import hf_checkpoint_index, read_index
from megatron_vespo.plan.layout import ClusterOptions, GiB, PlanError, check_layout, parse_size, resolve_world


def _check(data: dict, **cluster):
    job = job_from(data)
    from megatron_vespo.models.qwen3_moe import get_hf_config

    check_layout(job, get_hf_config(job.model), resolve_world(job.parallel, ClusterOptions(**cluster)))


def _with(data: dict, section: str, **values) -> dict:
    data = json.loads(json.dumps(data))
    data.setdefault(section, {}).update(values)
    return data


@pytest.mark.parametrize("section,values,field", [
    ("parallel", {"expert_model_parallel_size": 6}, "parallel.expert_model_parallel_size=6 does not divide "
                                                    "num_experts=128"),
    ("parallel", {"tensor_model_parallel_size": 8}, "parallel.tensor_model_parallel_size=8 does not divide "
                                                    "num_key_value_heads=4"),
    ("parallel", {"pipeline_model_parallel_size": 5}, "parallel.pipeline_model_parallel_size=5 does not divide "
                                                      "num_hidden_layers=48"),
    ("train", {"rollout_batch_size": 64, "mini_batch_size": 4, "micro_batch_size": 4},
     "train.mini_batch_size=4 must be a multiple of train.micro_batch_size x data-parallel size"),
    ("rollout", {"tp_size": 3}, "rollout.tp_size=3"),
    ("parallel", {"sequence_parallel": False}, "parallel.sequence_parallel must be true"),
])
def test_bad_layout_is_refused_naming_the_field(section, values, field):
    with pytest.raises(PlanError) as err:
        _check(_with(ep8_job_dict(), section, **values))
    assert field in str(err.value)


def test_world_size_from_nodes_must_hold_the_layout():
    with pytest.raises(PlanError, match="world size 12 .* not a multiple"):
        _check(ep8_job_dict(), gpus_per_node=4, nodes=3)
    _check(ep8_job_dict(), gpus_per_node=8, nodes=2)  # 16 GPUs: DP 4, expert DP 2


def test_all_problems_are_listed_at_once():
    data = _with(ep8_job_dict(), "parallel", expert_model_parallel_size=6, tensor_model_parallel_size=8)
    with pytest.raises(PlanError) as err:
        _check(data)
    assert "expert_model_parallel_size=6" in str(err.value) and "num_key_value_heads=4" in str(err.value)


def test_cli_refuses_a_bad_layout_before_building(tmp_path, caplog):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(ep8_job_dict()))
    with caplog.at_level(logging.ERROR):
        rc = main(["plan", str(cfg), "--set", "parallel.expert_model_parallel_size=6"])
    assert rc == 2
    assert "parallel.expert_model_parallel_size=6 does not divide num_experts=128" in caplog.text


def test_job_that_needs_more_than_80gb_is_refused_with_what_to_change(tmp_path, caplog):
    # TP4/EP8 on 8 x 80 GB without recompute, offload or precision-aware Adam: the unsharded expert
    # optimizer states (expert DP = 1) push it past the GPU (slime's recipe needs CPU Adam here)
    cfg, out = tmp_path / "job.yaml", tmp_path / "plan.json"
    cfg.write_text(yaml.safe_dump(ep8_job_dict()))
    with caplog.at_level(logging.ERROR):
        rc = main(["plan", str(cfg), "--gpu-mem", "80GiB", "--json", str(out)])
    assert rc == 2
    plan = json.loads(out.read_text())
    need = plan["memory"]["total"] / GiB
    assert need > 80 * 0.9
    (problem,) = [p for p in plan["problems"] if p.startswith("memory:")]
    assert "largest term: optimizer" in problem and "train.optimizer_cpu_offload=true" in problem
    assert "memory: rank" in caplog.text
    fits = {v["gpu_mem_gib"]: v["fits"] for v in plan["memory"]["verdicts"]}
    assert not fits[80] and fits[141]
    # the plan also shows what full recompute would save on activations
    assert plan["memory"]["activation_options"]["full, uniform, 1 layer"] < \
        plan["memory"]["activation_options"]["no recompute"] / 4


def test_missing_checkpoint_directory_names_model_hf_path(tmp_path, caplog):
    data = ep8_job_dict()
    data["model"]["hf_path"] = str(tmp_path / "nope")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with caplog.at_level(logging.ERROR):
        assert main(["plan", str(cfg)]) == 2
    assert "model.hf_path" in caplog.text


def test_shipped_tensor_index_is_the_config_derivation_and_has_the_published_count():
    import transformers

    assert sorted(p.name for p in CONFIG_30B.iterdir()) == ["config.json"]  # what the 30B plans start from
    cfg = transformers.AutoConfig.from_pretrained(CONFIG_30B)
    index = read_index(INDEX_30B)
    assert index == hf_checkpoint_index(cfg)
    per_layer = 4 + 2 + 2 + 1 + cfg.num_experts * 3  # q/k/v/o, q/k norms, 2 layer norms, router, experts
    assert len(index) == cfg.num_hidden_layers * per_layer + 3 == 18_867
    assert index["model.layers.47.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert index["model.layers.0.self_attn.k_proj.weight"] == (512, 2048)


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GiB), ("80GB", 80e9), ("141G", 141 * GiB), (80, 80 * GiB)])
def test_parse_size(text, expected):
    assert parse_size(text) == int(expected)


def test_parse_size_rejects_garbage():
    with pytest.raises(ConfigError, match="--gpu-mem 'lots'"):
        parse_size("lots", "--gpu-mem")


def test_pipeline_and_expert_parallel_layout_plans_with_full_coverage():
    # 4 layers over 2 stages x EP2: the export's pipeline-owner table and broadcasts run on the fake group
    from megatron_vespo.plan.report import run_plan

    job = job_from({"model": {"preset": "tiny-4l"},
                    "parallel": {"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2},
                    "train": {"rollout_batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 1}})
    plan = run_plan(job, ClusterOptions(gpus_per_node=4))
    par, conv = plan["parameters"], plan["conversion"]
    assert plan["layout"]["world"] == 4 and len(par["per_rank"]) == 4
    assert {(r["pp"], r["ep"]) for r in par["per_rank"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(r["layers"] == 2 for r in par["per_rank"])
    assert par["total"] == par["hf_model"]
    assert conv["matched"] == conv["expected"] and not conv["not_imported"]
    assert plan["weight_sync"]["export_collectives"].get("broadcast", 0) > 0
    # 1F1B: the first stage holds 2 micro-batches of activations, the last one 1
    assert plan["memory"]["micro_batches_in_flight"] in (1, 2)
    assert plan["problems"] == []


def test_any_qwen3_moe_from_its_config_alone(tmp_path):
    # Qwen3-235B-A22B's published architecture, written as a config.json-only directory: nothing in
    # the planner is specific to the 30B numbers
    cfg = json.loads((CONFIG_30B / "config.json").read_text())
    cfg.update(hidden_size=4096, intermediate_size=12288, num_hidden_layers=94, num_attention_heads=64,
               moe_intermediate_size=1536, max_window_layers=94)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from megatron_vespo.plan.report import run_plan

    data = ep8_job_dict()
    data["model"]["hf_path"] = str(tmp_path)
    plan = run_plan(job_from(data))
    par, conv = plan["parameters"], plan["conversion"]
    assert par["total"] == par["hf_model"] and abs(par["total"] / 235e9 - 1) < 0.01  # published: 235B
    assert abs(par["active"] / 22e9 - 1) < 0.05  # published: 22B activated
    assert conv["matched"] == conv["expected"] == 94 * (9 + 128 * 3) + 3
    assert any(p.startswith("memory:") for p in plan["problems"])  # 235B does not fit one 8 x 80 GB node


def test_build_on_a_machine_that_reports_cuda_stays_on_meta():
    # a GPU login node: the meta build must not move shards to the GPU or initialise on it
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True  # what a GPU login node reports
        import transformers
        from megatron_vespo.models.presets import preset_kwargs
        from megatron_vespo.plan.shards import build_shards
        from megatron_vespo.train.config import ParallelConfig
        r = build_shards(transformers.Qwen3MoeConfig(**preset_kwargs("tiny")), ParallelConfig(), 1,
                         params_dtype="float32")
        assert torch.cuda.is_available() and r.total == 157056 and len(r.export) == 69, r.total
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
