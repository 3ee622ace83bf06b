"""Low-precision actor updates: fp16 loss scaling and bf16 parity with fp32 (one process).

Regression: the actor never set ``TransformerConfig.grad_scale_func``, so under fp16 the
schedule did not multiply the loss by the optimizer's loss scale while the optimizer still
divided the gradients by it (2**32): the first update's grad norm came out ~1e-9 and the
weights barely moved. And DDP's fatal NaN check aborted the run on the first loss-scale
overflow, which fp16's optimizer is meant to absorb (skip the step, halve the scale).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test")

SCRIPT = textwrap.dedent("""
    import json, sys
    from megatron_vespo.losses.config import LossConfig
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.train.actor import MegatronActor
    from megatron_vespo.train.config import ParallelConfig, TrainConfig
    from megatron_vespo.train.synthetic import synthetic_batch

    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        train = TrainConfig(rollout_batch_size=4, mini_batch_size=4, micro_batch_size=2, lr=1e-3, clip_grad=0.0)
        actor = MegatronActor(ModelConfig(params_dtype=dtype), ParallelConfig(), train, LossConfig(name="vespo"),
                              init="layout_invariant")
        batch = synthetic_batch(4, 12, actor.hf_cfg.vocab_size, seed=0)
        skipped = 0
        for _ in range(40):  # fp16: overflowing steps are skipped (weights unchanged) while the scale drops
            m = actor.train_on_rollout(batch)[0]
            if m["update_ok"]:
                break
            skipped += 1
        out[dtype] = {"grad_norm": m["grad_norm"], "ok": m["update_ok"], "skipped": skipped,
                      "scale_func": actor.model[0].config.grad_scale_func is not None}
        from megatron_vespo.train.parallel import destroy_parallel
        destroy_parallel()
    print("RESULT" + json.dumps(out))
""")


def test_fp16_and_bf16_first_update_gradients_match_fp32():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    import json

    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    ref = res["float32"]["grad_norm"]
    assert ref > 1e-3
    for dtype in ("float16", "bfloat16"):
        assert res[dtype]["scale_func"], dtype
        assert res[dtype]["ok"] == 1.0, res
        # the first applied update sees the initial weights: same gradient as fp32 up to precision
        assert res[dtype]["grad_norm"] == pytest.approx(ref, rel=0.1), (dtype, res)
    assert res["bfloat16"]["skipped"] == 0, res
