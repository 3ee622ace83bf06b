"""Weights loaded into a built actor survive the first optimizer step (bf16: fp32 main params).

Megatron's optimizer keeps fp32 main copies of bf16 weights (and the distributed optimizer of
all weights); loading a checkpoint without refreshing them made the first step write the random
initialisation back. Runs in a subprocess: it owns torch.distributed and Megatron's globals.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
HERE = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {here!r})
    from tiny_hf import make_tiny_hf
    from megatron_vespo.checkpoint.config import CheckpointConfig
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict
    from megatron_vespo.checkpoint.checkpointer import Checkpointer
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig
    from megatron_vespo.train.synthetic import synthetic_batch

    hf = make_tiny_hf({tmp!r}, num_hidden_layers=2, dtype=torch.bfloat16)
    train = TrainConfig(rollout_batch_size=4, mini_batch_size=4, micro_batch_size=2, lr=1e-4)
    actor = MegatronActor(ModelConfig(preset=None, hf_path=str(hf), params_dtype="bfloat16"), ParallelConfig(),
                          train, LossConfig(name="vespo"))
    ckpt = Checkpointer(CheckpointConfig(), actor.hf_cfg)
    ckpt.load_weights(actor.model, str(hf), actor.optimizer)
    loaded = {{k: v.float().clone() for k, v in export_hf_state_dict(actor.model, actor.hf_cfg).items()}}
    batch = synthetic_batch(4, 12, actor.hf_cfg.vocab_size, seed=0)
    actor.train_on_rollout(batch)
    after = export_hf_state_dict(actor.model, actor.hf_cfg)
    worst = max(((after[k].float() - loaded[k]).norm() / loaded[k].norm().clamp(min=1e-6)).item() for k in loaded)
    print("WORST", worst)
    assert worst < 0.05, worst  # one small Adam step from the loaded weights, not a jump back to the init
""")


def test_loaded_weights_survive_the_first_step(tmp_path):
    code = SCRIPT.format(here=str(HERE), tmp=str(tmp_path / "hf"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
