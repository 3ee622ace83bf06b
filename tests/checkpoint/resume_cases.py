"""Shared helpers of the resume tests: a tiny actor, a few synthetic rollout batches, a run that
saves a training checkpoint midway, and a run that resumes from it."""

from __future__ import annotations

import torch

STEPS, SAVE_AT = 4, 2


def make_actor(parallel_kwargs: dict, seed: int):
    """A tiny MegatronActor (VESPO loss, 2 updates per rollout batch, warmup + cosine LR)."""
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig

    train = TrainConfig(rollout_batch_size=4, mini_batch_size=2, micro_batch_size=1, lr=1e-2, train_iters=STEPS,
                        lr_warmup_steps=2, lr_decay_style="cosine", weight_decay=0.01)
    return MegatronActor(ModelConfig(preset="tiny", seed=seed), ParallelConfig(**parallel_kwargs), train,
                         LossConfig(name="vespo"), init="layout_invariant")


def _batch(step: int):
    from megatron_vespo.train.synthetic import synthetic_batch

    return synthetic_batch(4, 16, 256, seed=100 + step)


def _record(metrics: list[dict]) -> list[tuple]:
    return [(m["loss/micro_batch_sum"], m["grad_norm"], m["lr"]) for m in metrics]


def _dataset():
    from megatron_vespo.data.prompts import PromptDataset, synthetic_prompts

    return PromptDataset(synthetic_prompts(10, 256, 4, seed=0), seed=3)


def run_and_save(save_dir: str, parallel_kwargs: dict) -> dict:
    """Uninterrupted run of STEPS rollout steps, saving a training checkpoint after SAVE_AT steps."""
    from megatron_vespo.checkpoint.training import save_trainer_checkpoint

    actor, data = make_actor(parallel_kwargs, seed=1), _dataset()
    out: dict = {"steps": []}
    for step in range(STEPS):
        data.next_batch(3)
        out["steps"].append(_record(actor.train_on_rollout(_batch(step))))
        if step + 1 == SAVE_AT:
            save_trainer_checkpoint(save_dir, step + 1, model=actor.model, hf_cfg=actor.hf_cfg,
                                    optimizer=actor.optimizer, scheduler=actor.scheduler, keep_last=1,
                                    state={"updates": actor.updates, "policy_version": step + 1,
                                           "data": data.state_dict()})
            out["rng_after_save"] = torch.rand(3)
            out["next_prompts"] = [p.index for p in _copy_dataset(data).next_batch(3)]
    return out


def _copy_dataset(data):
    clone = _dataset()
    clone.load_state_dict(data.state_dict())
    return clone


def resume(save_dir: str, parallel_kwargs: dict) -> dict:
    """A fresh actor (other init seed) that loads the checkpoint and runs the remaining steps."""
    from megatron_vespo.checkpoint.training import load_trainer_checkpoint

    actor, data = make_actor(parallel_kwargs, seed=2), _dataset()
    state = load_trainer_checkpoint(save_dir, model=actor.model, optimizer=actor.optimizer,
                                    scheduler=actor.scheduler)
    out = {"state": state, "rng_after_load": torch.rand(3)}
    actor.updates = state["updates"]
    data.load_state_dict(state["data"])
    out["next_prompts"] = [p.index for p in _copy_dataset(data).next_batch(3)]
    out["steps"] = [_record(actor.train_on_rollout(_batch(step))) for step in range(state["iteration"], STEPS)]
    return out


def save_then_resume(save_dir: str, save_layout: dict, resume_layouts: dict) -> dict:
    """Both runs in one process (parallel state torn down in between): {name: result}."""
    from megatron_vespo.train.parallel import destroy_parallel

    results = {"saved": run_and_save(save_dir, save_layout)}
    for name, layout in resume_layouts.items():
        destroy_parallel()
        results[name] = resume(save_dir, layout)
    destroy_parallel()
    return results
