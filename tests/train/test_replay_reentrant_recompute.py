"""Routing replay under an activation checkpoint that does not set Megatron's checkpointing flag.

With FP8 (or FP4) Megatron recomputes through Transformer Engine's ``te_checkpoint``
(``transformer_block.py:507``, ``moe_layer.py:433``, ``transformer_layer.py:721``), which does
not set ``tensor_parallel.random.IS_CHECKPOINTING``. The replay hooks used only that flag to
tell the first (no-grad) forward and the backward re-run apart, so under FP8 + recompute the
re-run found no routes queued (R2/R3 training failed). Here a reentrant
``torch.utils.checkpoint`` plays te_checkpoint's part: same no-grad forward, re-run inside
backward, no Megatron flag.
"""

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test"),
              pytest.mark.usefixtures("parallel_teardown_module")]

from actor_cases import make_actor, make_batch  # noqa: E402


def _flagless_checkpoint(function, distribute_saved_activations, *args):
    import torch.utils.checkpoint

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)


def test_r3_replays_routes_in_a_te_style_recompute(monkeypatch):
    over = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    ref_actor = make_actor({}, routing="R3")
    ref = ref_actor.train_on_rollout(make_batch(ref_actor))
    from megatron.core import tensor_parallel

    monkeypatch.setattr(tensor_parallel, "checkpoint", _flagless_checkpoint)
    actor = make_actor({}, routing="R3", overrides=over)
    got = actor.train_on_rollout(make_batch(actor))
    assert got[0]["routing/replayed_recomputes"] == 4  # 2 MoE layers x 2 micro-batches re-run in backward
    for a, b in zip(ref, got):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
