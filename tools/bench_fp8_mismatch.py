"""Train/rollout mismatch under FP8 on the tiny model: log-prob gap, routing drift, VESPO's W and ESS.

For every (rollout precision, trainer precision, routing replay) cell, one rollout batch is
sampled by an embedded engine serving the actor's initial weights (``hp``: as trained; ``fp8w``:
the block-FP8 export, ``weight_sync.dtype=fp8``; ``fp8``: that plus activations quantised per
1 x block token group like SGLang's dynamic scheme), and a fresh actor with the same weights
(``hp``, or ``fp8``: emulated blockwise E4M3 with the export's block and FP32 scales, so both
sides round weights and activations alike) measures on it:

* token |log pi_train - log mu_rollout| mean and the k3 KL(mu || pi) (``train/mismatch.py``;
  R3 scores with the rollout's routes replayed, off / R2 with the trainer's own routing);
* routing drift: 1 - the fraction of the rollout's top-k experts the trainer also picks (its own
  router, recorded as R2 records it; 0 by construction under R3 replay);
* VESPO's sequence weight W = pi_theta / mu_rollout (``train.old_log_prob_source=rollout``) at the
  first update (pure mismatch) and its ESS, plus the mean ESS over the N = 4 updates of the batch.

Figures are ratios of log-probabilities from one run (no timing): they do not depend on load.

    python tools/bench_fp8_mismatch.py --seeds 0 1 [--out fp8_mismatch.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# 16 = the tiny model's head_dim: tiles of the fused Megatron qkv then hold one head, as the HF q/k/v tiles do
# (Qwen3-30B-A3B's head_dim is 128 = the SGLang block, so the same holds there)
B, MINI, N_PER_PROMPT, BLOCK = 32, 8, 4, (16, 16)


def make_actor(prec: str, replay: str, seed: int, dtype: str = "float32") -> Any:
    """A tiny actor with layout-invariant weights from ``seed`` (identical for every cell). ``prec``:
    ``hp``; ``fp8``: emulated blockwise E4M3 with the rollout export's block and FP32 scales, so both
    sides round alike; ``fp8p2``: the same with TE's default power-of-two block scales."""
    from megatron_vespo.fp8 import FP8Config
    from megatron_vespo.fp8.emulate import emulate_fp8
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.routing.config import RoutingReplayConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig

    train = TrainConfig(rollout_batch_size=B, mini_batch_size=MINI, micro_batch_size=MINI, lr=1e-3,
                        old_log_prob_source="rollout")
    actor = MegatronActor(ModelConfig(preset="tiny", seed=seed, params_dtype=dtype), ParallelConfig(), train,
                          LossConfig(name="vespo"), RoutingReplayConfig(mode={"off": "disabled"}.get(replay, replay)),
                          init="layout_invariant")
    if prec != "hp":
        os.environ["NVTE_FP8_BLOCK_SCALING_FP32_SCALES"] = "0" if prec == "fp8p2" else "1"
        emulate_fp8(actor.model, FP8Config(fp8="e4m3", fp8_recipe="blockwise", emulate=True), block=BLOCK[0])
    return actor


def rollout(actor: Any, mode: str, seed: int, tmp: Path, dtype: str = "float32") -> Any:
    """Serve the actor's weights and sample one batch with routes. ``mode``: ``hp`` (the HF export),
    ``fp8w`` (the block-FP8 export: FP8 weights), ``fp8`` (also activations quantised per 1 x block
    token group, as SGLang's dynamic scheme does)."""
    from megatron_vespo.buffer.batch import collate
    from megatron_vespo.checkpoint.hf_dir import save_hf_checkpoint
    from megatron_vespo.fp8.blockwise import BlockFP8Format
    from megatron_vespo.fp8.emulate import emulate_activations_
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.rollout.config import SamplingConfig
    from megatron_vespo.rollout.embedded.server import start_embedded_server
    from megatron_vespo.rollout.routes import RouteSpec

    wdtype = getattr(torch, dtype)
    path = save_hf_checkpoint(actor.model, actor.hf_cfg, tmp / f"hf_{mode}_{seed}",
                              dtype=BlockFP8Format(block=BLOCK, dtype=wdtype) if mode != "hp" else wdtype)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, actor.hf_cfg.vocab_size, (6,), generator=g).tolist() for _ in range(B // N_PER_PROMPT)]
    handle = start_embedded_server(str(path), mode="thread", dtype=dtype)
    if mode == "fp8":
        emulate_activations_(handle.engine.model, group=BLOCK[1])

    async def go() -> list:
        client = SGLangClient(handle.url, route_spec=RouteSpec.from_hf_config(str(path)), return_routed_experts=True)
        try:
            return await client.generate_batch(prompts, SamplingConfig(temperature=1.0, max_new_tokens=16,
                                                                       sampling_seed=seed), N_PER_PROMPT)
        finally:
            await client.aclose()
    try:
        samples = asyncio.run(go())
    finally:
        handle.stop()
    adv = torch.tensor([1.0 if (i // N_PER_PROMPT) % 2 == 0 else -1.0 for i in range(B)])
    return collate(samples, advantages=adv)


def measure(actor: Any, batch: Any, replay: str) -> dict[str, float]:
    """Gap, drift and W / ESS of one cell (consumes the batch: the actor trains N updates on it)."""
    from megatron_vespo.train.mismatch import log_prob_mismatch, routing_agreement, routing_agreement_counts

    mask = batch.loss_mask
    lp, _ = actor.compute_log_probs(batch)  # an R3 actor replays the batch's (rollout) routes
    out = log_prob_mismatch(lp * mask, batch.rollout_log_probs.float(), mask)
    if replay == "R2":
        _, _, recorded = actor._log_prob_pass(batch, with_entropy=False, routes=None, record=True)
        agree = routing_agreement(routing_agreement_counts(recorded, batch.routed_experts),
                                  actor.hf_cfg.num_experts_per_tok)
        out["routing/drift"] = 1.0 - agree["routing/expert_overlap"]
    elif replay == "R3":
        out["routing/drift"] = 0.0
    metrics = actor.train_on_rollout(batch)
    out["vespo/seq_log_w_absmax_update0"] = float(metrics[0]["is/seq_log_w_absmax"])
    out["vespo/ess_update0"] = float(metrics[0]["loss/vespo/ess"])
    out["vespo/ess_mean"] = sum(float(m["loss/vespo/ess"]) for m in metrics) / len(metrics)
    return out


def main() -> None:
    """Run every cell for each seed; print a markdown table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default=None, help="JSON file for the raw figures")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="high precision of both sides (trainer params, engine weights)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from megatron_vespo.train.parallel import destroy_parallel

    cells = [(r, t, rep) for r, t in (("hp", "hp"), ("fp8w", "hp"), ("fp8", "hp"), ("fp8w", "fp8"), ("fp8", "fp8"),
                                      ("fp8", "fp8p2"), ("hp", "fp8")) for rep in ("off", "R2", "R3")]
    rows: dict[tuple, list[dict]] = {c: [] for c in cells}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            batches = {}
            for rp in ("hp", "fp8w", "fp8"):
                actor = make_actor("hp", "off", seed, args.dtype)
                batches[rp] = rollout(actor, rp, seed, Path(tmp), args.dtype)
                del actor
            for r, t, rep in cells:
                actor = make_actor(t, rep, seed, args.dtype)
                rows[(r, t, rep)].append(measure(actor, batches[r], rep))
                del actor
            destroy_parallel(destroy_process_group=True)
    keys = ["mismatch/abs_diff_mean", "mismatch/k3_kl", "routing/drift", "vespo/seq_log_w_absmax_update0",
            "vespo/ess_update0", "vespo/ess_mean"]
    for r, t, _ in cells:  # without replay the trainer routes with its own router, as the R2 record shows
        for x, y in zip(rows[(r, t, "off")], rows[(r, t, "R2")]):
            x["routing/drift"] = y["routing/drift"]
    print(f"seeds {args.seeds}, high precision = {args.dtype}, FP8 = blockwise E4M3 {list(BLOCK)} FP32 scales")
    print("| rollout | trainer | replay | mean abs dlogp | k3 KL | routing drift | max abs log W (update 0) | "
          "ESS update 0 | ESS mean (N=4) |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for (r, t, rep), rs in rows.items():
        mean = {k: sum(x.get(k, float("nan")) for x in rs) / len(rs) for k in keys}
        summary[f"{r}/{t}/{rep}"] = {"mean": mean, "runs": rs}
        print(f"| {r} | {t} | {rep} | {mean['mismatch/abs_diff_mean']:.4f} | {mean['mismatch/k3_kl']:.2e} | "
              f"{mean['routing/drift']:.3f} | {mean['vespo/seq_log_w_absmax_update0']:.3f} | "
              f"{mean['vespo/ess_update0']:.3f} | {mean['vespo/ess_mean']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"seeds": args.seeds, "cells": summary}, indent=2))


if __name__ == "__main__":
    main()
