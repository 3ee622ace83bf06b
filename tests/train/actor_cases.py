"""Actor runs shared by the trainer tests (top-level functions so spawned ranks can import them)."""

from __future__ import annotations

from typing import Any, Optional

B, S, MINI, MICRO, LR = 8, 16, 4, 2, 1e-3


def make_actor(layout: dict, *, preset: str = "tiny", routing: str = "disabled", train: Optional[dict] = None,
               loss: Optional[dict] = None, overrides: Optional[dict] = None):
    """A MegatronActor with layout-invariant weights (same global model for every layout)."""
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.routing.config import RoutingReplayConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig

    tc = dict(rollout_batch_size=B, mini_batch_size=MINI, micro_batch_size=MICRO, lr=LR)
    tc.update(train or {})
    return MegatronActor(ModelConfig(preset=preset, transformer_overrides=overrides or {}), ParallelConfig(**layout),
                         TrainConfig(**tc), LossConfig(**(loss or {"name": "vespo"})),
                         RoutingReplayConfig(mode=routing), init="layout_invariant")


def make_batch(actor, seed: int = 1, batch_size: int = B, seq_len: int = S):
    """Synthetic rollout batch with random routes for this actor's model."""
    from megatron_vespo.models.qwen3_moe import num_moe_layers
    from megatron_vespo.train.synthetic import synthetic_batch

    hf = actor.hf_cfg
    return synthetic_batch(batch_size, seq_len, hf.vocab_size, seed=seed, num_moe_layers=num_moe_layers(hf),
                           topk=hf.num_experts_per_tok, num_experts=hf.num_experts)


def layout_runs(rank: int, world_size: int, cases: list[tuple[dict, str, str]], rollouts: int = 2,
                overrides: Optional[dict] = None) -> dict[str, Any]:
    """For each (layout, routing, preset): initial log-probs + (loss, grad norm, micro sum) per update."""
    from megatron_vespo.train.parallel import destroy_parallel

    out: dict[str, Any] = {}
    prev_layout = None
    for layout, routing, preset in cases:
        if prev_layout is not None and layout != prev_layout:
            destroy_parallel()
        prev_layout = layout
        actor = make_actor(layout, preset=preset, routing=routing, overrides=overrides)
        batch = make_batch(actor)
        lp, ent = actor.compute_log_probs(batch, with_entropy=True)
        traj = []
        for _ in range(rollouts):
            traj += [{k: m[k] for k in ("loss", "grad_norm", "loss/micro_batch_sum", "is/seq_log_w_absmax",
                                        "routing/replayed_recomputes") if k in m}
                     for m in actor.train_on_rollout(batch)]
        out[f"{preset}/{routing}"] = {"lp": lp, "entropy": ent, "traj": traj, "mask": batch.loss_mask}
    destroy_parallel()
    return out
