"""``run_plan``: the whole dry run of one job, as a JSON-friendly dict; ``render`` prints it as tables.

Order: read the model config (``model.hf_path`` may be a directory holding only ``config.json``,
or ``model.preset``), check the layout (errors name the field), build every distinct rank's
shard on meta (``plan.shards``), compare the export with the checkpoint index derived from the
config (and with ``model.safetensors.index.json`` when the directory has one), then memory per
GPU and the weight-sync plan. Problems that would stop the job (no fit at ``--gpu-mem``, a
conversion gap) are listed under ``problems``; ``check_plan`` raises them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from megatron_vespo.plan.layout import ClusterOptions, GiB, MemoryOptions, PlanError, check_layout, resolve_world

logger = logging.getLogger(__name__)


def _names_from_safetensors_index(hf_path: Optional[str]) -> Optional[set[str]]:
    if not hf_path:
        return None
    p = Path(hf_path) / "model.safetensors.index.json"
    if not p.is_file():
        return None
    try:
        return set(json.loads(p.read_text())["weight_map"])
    except (ValueError, KeyError) as exc:
        raise PlanError(f"{p}: not a safetensors index with a weight_map ({exc})") from exc


_CACHE: dict[str, Any] = {}


def cached_build(hf_cfg: Any, parallel: Any, world_size: int, **kwargs: Any) -> Any:
    """``plan.shards.build_shards``, memoised per (model, layout, world, export settings, index) in this process.

    Jobs that differ only in loss, rollout or memory options share the build (the tests plan
    several configs with one layout). When this process already has a ``torch.distributed``
    group, the build runs in a fresh spawned process (the fake group needs a clean one).
    """
    import hashlib

    index = kwargs.get("index") or {}
    key = hashlib.sha256(json.dumps([hf_cfg.to_dict(), parallel.model_dump(mode="json"), world_size,
                                     {k: v for k, v in kwargs.items() if k != "index"}, sorted(index.items())],
                                    sort_keys=True, default=str).encode()).hexdigest()
    if key not in _CACHE:
        import torch

        from megatron_vespo.plan.shards import build_shards

        if torch.distributed.is_initialized():
            import concurrent.futures
            import multiprocessing

            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                _CACHE[key] = ex.submit(build_shards, hf_cfg, parallel, world_size, **kwargs).result()
        else:
            _CACHE[key] = build_shards(hf_cfg, parallel, world_size, **kwargs)
        while len(_CACHE) > 4:
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


def conversion_report(build: Any, index: dict[str, tuple], published: Optional[set[str]] = None) -> dict[str, Any]:
    """Export vs checkpoint index (names and shapes), import coverage."""
    exp = build.export
    out = {
        "expected": len(index), "exported": len(exp),
        "missing": sorted(set(index) - set(exp))[:20], "extra": sorted(set(exp) - set(index))[:20],
        "shape_mismatch": sorted(n for n in set(index) & set(exp) if tuple(index[n]) != tuple(exp[n]))[:20],
        "imported": len(build.imported), "not_imported": sorted(set(index) - set(build.imported))[:20],
        "import_reads": build.import_reads,
    }
    out["matched"] = sum(1 for n in index if n in exp and tuple(exp[n]) == tuple(index[n]))
    if published is not None:
        out["safetensors_index"] = {"names": len(published), "missing": sorted(published - set(exp))[:20],
                                    "extra": sorted(set(exp) - published)[:20]}
    return out


def run_plan(job: Any, cluster: ClusterOptions = ClusterOptions(), *, spec: str = "te",
             index: Optional[dict[str, tuple]] = None, source: str = "") -> dict[str, Any]:
    """Plan ``job`` (a ``JobConfig``) on ``cluster``; raises PlanError when the layout cannot work."""
    from megatron_vespo.fp8.te import check_fp8_job
    from megatron_vespo.models.qwen3_moe import get_hf_config, num_moe_layers
    from megatron_vespo.plan.activations import ActivationInputs, micro_batch_activation_bytes
    from megatron_vespo.plan.hf_index import hf_checkpoint_index, hf_model_param_count
    from megatron_vespo.plan.memory import (
        _DTYPE_BYTES,
        batch_transfer_bytes,
        optimizer_split,
        rank_memory,
        seq_len,
        verdicts,
    )
    from megatron_vespo.plan.sync import sync_plan

    hf_cfg = get_hf_config(job.model)
    world = resolve_world(job.parallel, cluster)
    check_layout(job, hf_cfg, world)
    check_fp8_job(job.fp8, job.model, job.parallel, hf_cfg)
    mem = MemoryOptions.from_job(job)
    index = index if index is not None else hf_checkpoint_index(hf_cfg)
    build = cached_build(hf_cfg, job.parallel, world.size, params_dtype=job.model.params_dtype, index=index,
                         bucket_bytes=job.weight_sync.bucket_bytes,
                         export_dtype=getattr(job.weight_sync, "export_dtype", job.weight_sync.dtype),
                         **job.model.transformer_overrides)
    hf_count = hf_model_param_count(hf_cfg)
    k, n_exp = int(getattr(hf_cfg, "num_experts_per_tok", 0) or 0), int(getattr(hf_cfg, "num_experts", 0) or 0)
    active = build.total - build.expert_total + (build.expert_total * k // n_exp if n_exp else 0)
    mems = [rank_memory(sh, job, hf_cfg, world, mem, spec=spec) for sh in build.shards]
    worst = max(mems, key=lambda m: m.total)
    worst_shard = next(sh for sh in build.shards if sh.rank == worst.rank)
    dims = ActivationInputs.from_hf(hf_cfg, layers=worst_shard.layers,
                                    last_stage=worst_shard.pp == job.parallel.pipeline_model_parallel_size - 1)
    act_kw = dict(micro=job.train.micro_batch_size, seq=seq_len(job), tp=job.parallel.tensor_model_parallel_size,
                  nbytes=_DTYPE_BYTES[job.model.params_dtype], spec=spec)
    act_options = {
        "no recompute": micro_batch_activation_bytes(dims, **act_kw)["total"],
        "selective (core_attn)": micro_batch_activation_bytes(dims, **act_kw, recompute="selective")["total"],
        "full, uniform, 1 layer": micro_batch_activation_bytes(dims, **act_kw, recompute="full",
                                                               recompute_method="uniform",
                                                               recompute_num_layers=1)["total"],
    }
    plan: dict[str, Any] = {
        "job": source,
        "model": {"source": job.model.hf_path or f"preset {job.model.preset}", "layers": hf_cfg.num_hidden_layers,
                  "moe_layers": num_moe_layers(hf_cfg), "experts": n_exp, "topk": k, "hidden": hf_cfg.hidden_size,
                  "params_dtype": job.model.params_dtype},
        "layout": {"tp": job.parallel.tensor_model_parallel_size, "pp": job.parallel.pipeline_model_parallel_size,
                   "ep": job.parallel.expert_model_parallel_size,
                   "etp": job.parallel.expert_tensor_parallel_size or job.parallel.tensor_model_parallel_size,
                   "cp": job.parallel.context_parallel_size, "world": world.size, "nodes": world.nodes,
                   "gpus_per_node": world.gpus_per_node, "dp": world.dp, "expert_dp": world.expert_dp},
        "build": {"spec": build.spec, "distinct_ranks": len(build.shards), "seconds": round(build.build_s, 1)},
        "parameters": {"total": build.total, "total_padded": build.total_padded, "hf_model": hf_count,
                       "expert": build.expert_total, "active": active,
                       "per_rank": [{"rank": sh.rank, "ranks": sh.ranks, "tp": sh.tp, "pp": sh.pp, "ep": sh.ep,
                                     "etp": sh.etp, "params": sh.params, "expert_params": sh.expert_params,
                                     "bytes": sh.param_bytes, "grad_bytes": 4 * sh.params,
                                     "optimizer_bytes": optimizer_split(sh, job, world, mem),
                                     "layers": len(sh.layers)} for sh in build.shards]},
        "conversion": conversion_report(build, index, _names_from_safetensors_index(job.model.hf_path)),
        "memory": {"rank": worst.rank, "seq_len": worst.seq_len, "micro_batch": job.train.micro_batch_size,
                   "micro_batches_in_flight": worst.micro_in_flight, "terms": worst.terms, "total": worst.total,
                   "largest": worst.largest, "optimizer_options": worst.optimizer_options,
                   "activation_options": act_options, "options": mem.__dict__,
                   "batch_transfer_per_rank": batch_transfer_bytes(job, hf_cfg, world.dp),
                   "host_per_rank": worst.host_bytes, "host_per_node": worst.host_bytes * min(world.gpus_per_node,
                                                                                               world.size),
                   "per_rank_total": {m.rank: m.total for m in mems},
                   "verdicts": verdicts(worst, job, world, mem, cluster)},
        "weight_sync": sync_plan(job, build, cluster.link_gbps),
    }
    plan["problems"] = _problems(plan, cluster)
    return plan


def _problems(plan: dict[str, Any], cluster: ClusterOptions) -> list[str]:
    out = []
    conv, par = plan["conversion"], plan["parameters"]
    if conv["matched"] != conv["expected"] or conv["extra"]:
        out.append(f"conversion: {conv['matched']} of {conv['expected']} HF tensors match the export (missing "
                   f"{conv['missing'][:3]}, extra {conv['extra'][:3]}, shapes {conv['shape_mismatch'][:3]})")
    if conv["not_imported"]:
        out.append(f"conversion: the import does not read {conv['not_imported'][:3]} ...")
    if par["total"] != par["hf_model"]:
        out.append(f"parameters: the Megatron shards hold {par['total']} parameters, the HF model {par['hf_model']}")
    m = plan["memory"]
    planned = next(v for v in m["verdicts"] if v["planned"])
    if not planned["fits"]:
        out.append(f"memory: rank {m['rank']} needs {planned['need_gib']:.1f} GiB per GPU, {planned['usable_gib']:.1f} "
                   f"GiB usable of --gpu-mem {planned['gpu_mem_gib']:.0f} GiB; largest term: {planned['largest']} "
                   f"({m['terms'][planned['largest']] / GiB:.1f} GiB); {planned['change']}")
    if cluster.host_mem is not None and m["host_per_node"] > cluster.host_mem:
        out.append(f"host memory: {m['host_per_node'] / GiB:.0f} GiB per node needed (batch transfer + offloaded "
                   f"optimizer states), --host-mem {cluster.host_mem / GiB:.0f} GiB; lower train.rollout_batch_size")
    return out


def check_plan(plan: dict[str, Any]) -> None:
    """Raise PlanError listing ``plan["problems"]`` (nothing when there are none)."""
    if plan["problems"]:
        raise PlanError("the plan found problems that would stop this job:\n"
                        + "\n".join(f"  - {p}" for p in plan["problems"]))


def _g(x: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= size or unit == "KiB":
            return f"{x / size:8.2f} {unit}"
    return ""


def _n(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def render(plan: dict[str, Any]) -> str:
    """The plan as plain-text tables."""
    lay, par, conv, m, ws = plan["layout"], plan["parameters"], plan["conversion"], plan["memory"], plan["weight_sync"]
    lines = [f"plan: {plan['job']}  model: {plan['model']['source']} ({plan['model']['params_dtype']})",
             f"layout: TP{lay['tp']} PP{lay['pp']} EP{lay['ep']} ETP{lay['etp']} CP{lay['cp']} on {lay['world']} GPUs "
             f"({lay['nodes']} node(s) x {lay['gpus_per_node']}); DP {lay['dp']}, expert DP {lay['expert_dp']}",
             f"built {plan['build']['distinct_ranks']} distinct rank shard(s) on meta in {plan['build']['seconds']}s "
             f"({plan['build']['spec']})", "",
             f"parameters: total {par['total']:,} ({_n(par['total'])}; HF model {par['hf_model']:,}), "
             f"active {par['active']:,} ({_n(par['active'])}), experts {par['expert']:,}",
             f"  {'rank(s)':<18}{'tp':>3}{'pp':>3}{'ep':>4}{'etp':>4}{'params':>16}{'expert':>16}{'bytes':>14}"]
    for r in par["per_rank"]:
        ranks = ",".join(map(str, r["ranks"][:4])) + ("..." if len(r["ranks"]) > 4 else "")
        lines.append(f"  {ranks:<18}{r['tp']:>3}{r['pp']:>3}{r['ep']:>4}{r['etp']:>4}{r['params']:>16,}"
                     f"{r['expert_params']:>16,}{_g(r['bytes']):>14}")
    lines += ["", f"conversion coverage: {conv['matched']:,} of {conv['expected']:,} HF tensors (names and shapes) "
                  f"exported; import reads {conv['imported']:,} of {conv['expected']:,}"]
    if "safetensors_index" in conv:
        si = conv["safetensors_index"]
        lines.append(f"  model.safetensors.index.json: {si['names']:,} names, missing {len(si['missing'])}, "
                     f"extra {len(si['extra'])}")
    lines += ["", f"memory per GPU (rank {m['rank']}, S = {m['seq_len']}, micro-batch {m['micro_batch']}, "
                  f"{m['micro_batches_in_flight']} in flight):"]
    lines += [f"  {name:<24}{_g(v)}" for name, v in m["terms"].items()]
    lines.append(f"  {'total':<24}{_g(m['total'])}   largest: {m['largest']}")
    totals = list(m["per_rank_total"].values())
    if len(totals) > 1 and min(totals) != max(totals):
        lines.append(f"  other ranks: {_g(min(totals)).strip()} .. {_g(max(totals)).strip()} (pipeline stages differ)")
    lines.append(f"  rollout batch received per rank: {_g(m['batch_transfer_per_rank']).strip()}")
    lines.append(f"  host RAM: {_g(m['host_per_rank'])} per rank, {_g(m['host_per_node'])} per node "
                 "(received rollout batch + offloaded optimizer states)")
    lines.append("  optimizer states: " + "; ".join(f"{k} {_g(v).strip()}" for k, v in m["optimizer_options"].items()))
    lines.append("  activations per micro-batch: " + "; ".join(f"{k} {_g(v).strip()}"
                                                              for k, v in m["activation_options"].items()))
    lines.append(f"  {'GPU':>8}{'usable':>10}{'need':>10}  verdict")
    for v in m["verdicts"]:
        mark = "*" if v["planned"] else " "
        verdict = "fits" if v["fits"] else f"does not fit ({v['largest']}): {v['change']}"
        lines.append(f" {mark}{v['gpu_mem_gib']:>6.0f}G{v['usable_gib']:>9.1f}G{v['need_gib']:>9.1f}G  {verdict}")
    lines += ["", f"weight sync ({ws['path']}, {ws['engines']} engine(s) x TP{ws['engine_tp']}, {ws['dtype']}): "
                  f"{ws['buckets']} buckets of <= {ws['bucket_mb']:g} MiB, {ws['tensors']:,} tensors, "
                  f"{_g(ws['bytes']).strip()}; {ws['http_calls']} HTTP calls, {ws['broadcasts']} broadcasts; "
                  f"trainer export {ws['export_collectives']}; ~{ws['seconds']:.1f}s at {ws['link_gbps']:g} Gbit/s"]
    if plan["problems"]:
        lines += ["", "PROBLEMS:"] + [f"  - {p}" for p in plan["problems"]]
    else:
        lines += ["", "no problems found"]
    return "\n".join(lines)


def write_json(plan: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the plan as JSON, atomically."""
    from megatron_vespo.utils.io import atomic_write_json

    atomic_write_json(path, plan)
