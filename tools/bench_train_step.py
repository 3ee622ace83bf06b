#!/usr/bin/env python
"""Benchmark one training update (forward + backward + optimizer) of the Megatron actor on CPU.

Layouts: 1 process, EP2 (alltoall), TP2 + SP (2 gloo processes, 1 thread each, so every
layout uses the machine's 2 cores), and as reference the same-size transformers
``Qwen3MoeForCausalLM`` trained with the same token-level policy-gradient loss and AdamW in
this process. Prints ms/update, tokens/s and the ratio to HF; ``--json`` writes them.

    python tools/bench_train_step.py --preset small --batch 8 --seq 128 --steps 10
    python tools/bench_train_step.py --profile      # torch.profiler table of the 1-process update
    python tools/bench_train_step.py --task-dir outputs/cpu_addition   # issue 15's update vs HF, see below

``--task-dir`` (the addition task of ``tools/addition_task.py``): one process, 1 thread, the SFT
model trained on a rollout-shaped batch (``--batch`` 64 rows of ``--seq`` 14 tokens, one
micro-batch, lr 3e-4, VESPO) by the Megatron actor and, alternating with it in the same process,
by the HF model with the same token-level policy-gradient loss, clipping and AdamW. The actor
also runs with the CPU speed-ups of issue 15 switched off (megatron's SequentialMLP forward and its
unfused DotProductAttention, its per-tensor clip-grad fallbacks, foreach instead of fused AdamW)
so "before" and "after" are measured side by side. The HF step uses fused AdamW, as
transformers' Trainer (and so TRL) does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch

from megatron_vespo.utils.net import free_port


def _megatron_worker(rank: int, world: int, port: int, args: argparse.Namespace, layout: dict, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig
    from megatron_vespo.train.synthetic import synthetic_batch

    dp = world // layout.get("tensor_model_parallel_size", 1)
    micro = max(1, min(args.micro, args.batch // dp))  # each DP rank gets batch / dp rows
    try:
        actor = MegatronActor(
            ModelConfig(preset=args.preset), ParallelConfig(**layout),
            TrainConfig(rollout_batch_size=args.batch, mini_batch_size=args.batch, micro_batch_size=micro,
                        lr=1e-5, old_log_prob_source="rollout"),
            LossConfig(name="vespo"), init="layout_invariant")
        batch = synthetic_batch(args.batch, args.seq, actor.hf_cfg.vocab_size, min_len=args.seq, seed=0)
        times = []
        for i in range(args.warmup + args.steps):
            m = actor.train_on_rollout(batch)[0]
            if i >= args.warmup:
                times.append(m["time/update_s"])
        if args.profile and rank == 0 and world == 1:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    actor.train_on_rollout(batch)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        queue.put((rank, times, None))
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        import traceback

        queue.put((rank, None, f"{exc}\n{traceback.format_exc()}"))


def bench_megatron(args: argparse.Namespace, layout: dict, world: int) -> list[float]:
    """Median-able list of update times (s) of rank 0 for ``layout`` on ``world`` processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_megatron_worker, args=(r, world, port, args, layout, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, times, err = queue.get(timeout=1800)
        if err:
            for p in procs:
                p.terminate()
            raise RuntimeError(f"rank {rank} failed: {err}")
        results[rank] = times
    for p in procs:
        p.join()
    return results[0]


def bench_hf(args: argparse.Namespace) -> list[float]:
    """Update times (s) of transformers' Qwen3MoeForCausalLM with the same loss and AdamW."""
    from transformers import Qwen3MoeForCausalLM

    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import get_hf_config
    from megatron_vespo.train.synthetic import synthetic_batch

    torch.set_num_threads(args.threads)
    cfg = get_hf_config(ModelConfig(preset=args.preset))
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = synthetic_batch(args.batch, args.seq, cfg.vocab_size, min_len=args.seq, seed=0)
    mask = batch.loss_mask[:, 1:]
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for start in range(0, args.batch, args.micro):
            sl = slice(start, start + args.micro)
            logits = model(input_ids=batch.tokens[sl]).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, batch.tokens[sl, 1:].unsqueeze(-1)).squeeze(-1)
            loss = -(batch.advantages[sl, None] * lp * mask[sl]).sum() / mask.sum()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def _cpu_speedups(actor, on: bool) -> None:
    """Switch the CPU speed-ups of issue 15 on or off (same bits either way, but attention and fused
    AdamW, which agree to float rounding; see their tests)."""
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_vespo.models.cpu_attention import CpuDotProductAttention
    from megatron_vespo.models.cpu_experts import CpuSequentialMLP
    from megatron_vespo.train import optim

    for m in actor.model[0].modules():
        if isinstance(m, SequentialMLP):
            m.__class__ = CpuSequentialMLP if on else SequentialMLP
        elif isinstance(m, DotProductAttention):
            m.__class__ = CpuDotProductAttention if on else DotProductAttention
    clip_grads.l2_norm_impl = optim.foreach_l2_norm if on else mutils.local_multi_tensor_l2_norm
    clip_grads.multi_tensor_scale_impl = optim.foreach_scale if on else mutils.local_multi_tensor_scale
    for opt in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        for group in opt.optimizer.param_groups:  # train.cpu_adam: fused (after) / foreach (before)
            group["fused"], group["foreach"] = on, not on


def bench_task(args: argparse.Namespace) -> dict:
    """Megatron update (speed-ups on / off) vs an HF step on the addition model, interleaved in one process."""
    from transformers import AutoModelForCausalLM

    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig
    from megatron_vespo.train.synthetic import synthetic_batch

    torch.set_num_threads(args.threads)
    sft = os.path.join(args.task_dir, "sft")
    actor = MegatronActor(ModelConfig(hf_path=sft), ParallelConfig(),
                          TrainConfig(rollout_batch_size=args.batch, mini_batch_size=args.batch,
                                      micro_batch_size=args.batch, lr=3e-4), LossConfig(name="vespo"))
    batch = synthetic_batch(args.batch, args.seq, actor.hf_cfg.vocab_size, seed=1)
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)  # transformers' Trainer default (TRL)
    mask = batch.loss_mask[:, 1:]

    def hf_step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.tokens).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, batch.tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        (-(batch.advantages[:, None] * lp * mask).sum() / mask.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def megatron(on: bool):
        def step() -> None:
            _cpu_speedups(actor, on)
            actor.train_on_rollout(batch)
        return step

    runs = {"hf": hf_step, "megatron_before": megatron(False), "megatron_after": megatron(True)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for i in range(args.warmup + args.steps):
        for name in names[i % 3:] + names[:i % 3]:  # rotate the order
            t0 = time.perf_counter()
            runs[name]()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    _cpu_speedups(actor, True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {k: {"ms": 1e3 * med[k], "ratio_to_hf": med[k] / med["hf"]} for k in runs}
    print(f"task={args.task_dir} rows={args.batch} seq={args.seq} threads={args.threads} steps={args.steps} "
          f"torch={torch.__version__} load={os.getloadavg()[0]:.1f}")
    for k, v in out.items():
        print(f"{k:18s} {v['ms']:8.1f} ms  {v['ratio_to_hf']:5.2f} x HF")
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="total CPU threads per layout")
    ap.add_argument("--layouts", default="1proc,ep2,tp2sp", help="comma list of 1proc, ep2, tp2sp")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the 1-process update")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every layout this many times (interleaved) and keep the fastest median: "
                         "robust to other load on a shared machine")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--task-dir", help="the addition task (tools/addition_task.py): Megatron update vs HF step, "
                                       "speed-ups on/off, one process (defaults become --batch 64 --seq 14 "
                                       "--threads 1 --steps 20)")
    args = ap.parse_args(argv)
    if args.task_dir:
        given = set(argv if argv is not None else sys.argv[1:])
        for flag, value in (("--batch", 64), ("--seq", 14), ("--threads", 1), ("--steps", 20)):
            if flag not in given:
                setattr(args, flag[2:], value)
        out = bench_task(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "results": out}, f, indent=2)
        return 0
    layouts = {"1proc": ({}, 1), "ep2": ({"expert_model_parallel_size": 2}, 2),
               "tp2sp": ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, 2)}
    tokens = args.batch * args.seq
    medians: dict[str, list[float]] = {}
    for r in range(args.rounds):
        names = ["hf"] + args.layouts.split(",")
        for name in names if r % 2 == 0 else names[::-1]:
            if name == "hf":
                medians.setdefault("hf_transformers", []).append(statistics.median(bench_hf(args)))
            else:
                layout, world = layouts[name]
                times = bench_megatron(args, layout, world)
                medians.setdefault(f"megatron_{name}", []).append(statistics.median(times))
                if name == "1proc":
                    args.profile = False  # profile once
    rows = {k: [min(v)] for k, v in medians.items()}
    hf_med = rows["hf_transformers"][0]
    print(f"preset={args.preset} batch={args.batch} micro={args.micro} seq={args.seq} threads={args.threads} "
          f"rounds={args.rounds} torch={torch.__version__} load={os.getloadavg()[0]:.1f}")
    print(f"{'layout':22s} {'ms/update':>10s} {'tokens/s':>10s} {'time / HF':>10s}")
    out = {}
    for name, times in rows.items():
        med = statistics.median(times)
        out[name] = {"ms_per_update": med * 1e3, "tokens_per_s": tokens / med, "ratio_to_hf": med / hf_med,
                     "all_round_medians_ms": [x * 1e3 for x in medians[name]]}
        print(f"{name:22s} {med * 1e3:10.1f} {tokens / med:10.0f} {med / hf_med:10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
