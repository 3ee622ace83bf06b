"""Every shipped ``examples/configs/*.yaml`` plans at full size (30B ones included) in CI.

The 30B configs name ``/models/Qwen3-30B-A3B-Base``; here ``model.hf_path`` points at a directory
holding only the published ``config.json`` (tests/plan/data/qwen3_30b_a3b), as a user plans before
downloading the weights. Builds of the same layout are shared (``plan.report.cached_build``).
"""

from __future__ import annotations

import math

import pytest
from _jobs import CONFIGS, index_30b, is_qwen3_30b, shipped_job, target_gpu_gib

from megatron_vespo.config.base import load_yaml
from megatron_vespo.plan.layout import ClusterOptions, GiB
from megatron_vespo.plan.report import render, run_plan

_PLANS: dict = {}


def _plan(path):
    if path not in _PLANS:
        data, job = shipped_job(path)
        index = index_30b() if is_qwen3_30b(data) else None
        cluster = ClusterOptions(gpu_mem=target_gpu_gib(path) * GiB)
        _PLANS[path] = (data, run_plan(job, cluster, index=index, source=path.name))
    return _PLANS[path]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_plans_with_full_conversion_coverage(path):
    data, plan = _plan(path)
    conv, par = plan["conversion"], plan["parameters"]
    assert conv["matched"] == conv["expected"] == conv["exported"], conv
    assert conv["not_imported"] == [] and conv["imported"] == conv["expected"]
    assert par["total"] == par["hf_model"]  # the shards together are exactly the HF model
    # the distinct shards cover the world: every rank belongs to exactly one class
    ranks = sorted(r for sh in par["per_rank"] for r in sh["ranks"])
    assert ranks == list(range(plan["layout"]["world"]))
    assert "no problems found" in render(plan) or plan["problems"]


@pytest.mark.parametrize("path", [p for p in CONFIGS if is_qwen3_30b(load_yaml(p))], ids=lambda p: p.stem)
def test_30b_totals_and_18867_tensors_from_the_real_build(path):
    _, plan = _plan(path)
    par, conv = plan["parameters"], plan["conversion"]
    # published: 30.5B total, 3.3B activated (Qwen3 model card, two significant digits)
    assert abs(par["total"] / 30.5e9 - 1) < 0.01
    assert par["total"] == 30_532_122_624
    # 3.353B counted (embedding and lm_head included, 8 of 128 experts): "3.3B" truncated to two digits
    assert math.floor(par["active"] / 1e8) == 33
    assert conv["matched"] == conv["expected"] == 18_867
    assert plan["layout"]["world"] % 8 == 0 and len(par["per_rank"]) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_single_node_config_fits_its_gpu_by_its_own_estimate(path):
    _, plan = _plan(path)
    if plan["layout"]["nodes"] != 1:
        pytest.skip(f"{path.name} spans {plan['layout']['nodes']} nodes")
    assert plan["problems"] == [], plan["problems"]
    planned = next(v for v in plan["memory"]["verdicts"] if v["planned"])
    assert planned["fits"] and planned["gpu_mem_gib"] == target_gpu_gib(path)
