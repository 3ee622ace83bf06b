"""Weight-sync errors found on rank 0 are raised on every training rank (no hang).

Regression: ``TensorWeightSync.push`` and ``DistributedWeightSync.push`` raised their
argument errors (wrong number of engine clients, no clients on rank 0) on rank 0 only, so
the other ranks entered the export's collectives and waited there until the process-group
timeout (30 minutes by default) instead of failing. ``DiskWeightSync.push`` raised an engine's
refusal on rank 0 only, and the other ranks went on into the next step's collectives alone.
"""

import pytest
import torch
from _dist import run_distributed

TINY = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32, "moe_intermediate_size": 8,
        "num_experts": 2, "num_experts_per_tok": 1, "tie_word_embeddings": False, "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"]}


def _push(rank, world, kind):
    import megatron_vespo.checkpoint.hf_weights as export
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync
    from megatron_vespo.weight_sync.tensor import TensorWeightSync

    def fake_export(*args, **kwargs):  # stands in for the collective export: one shared step
        t = torch.ones(1)
        torch.distributed.all_reduce(t)
        yield [("w", t)]

    export.iter_hf_weights = fake_export
    try:
        if kind == "disk":  # the engines refuse the new weights: only rank 0 sees it
            import megatron_vespo.checkpoint.hf_dir as hf_dir
            from megatron_vespo.weight_sync.disk import DiskWeightSync

            hf_dir.save_hf_checkpoint = lambda model, cfg, out, **kw: out

            async def load(path, version):
                raise RuntimeError("engine refused the weights")

            DiskWeightSync("/nonexistent/ws", TINY).push(None, 1, load=load if rank == 0 else None,
                                                         run=(lambda c: __import__("asyncio").run(c)))
        elif kind == "tensor":  # rank 0 has one engine client for two colocated ranks
            TensorWeightSync(TINY, engine_tp_size=1).push(None, 1, clients=["engine"] if rank == 0 else None,
                                                          run=(lambda c: None) if rank == 0 else None)
        else:  # rank 0 was given no clients
            DistributedWeightSync(TINY).push(None, 1)
    except Exception as exc:  # noqa: BLE001 - the test checks every rank raised
        return type(exc).__name__, str(exc)
    return "no error", ""


@pytest.mark.parametrize("kind", ["tensor", "distributed", "disk"])
def test_rank0_argument_error_is_raised_on_every_rank(kind):
    results = run_distributed(_push, 2, kind, timeout=60)
    for name, msg in results:
        assert name in ("ValueError", "RolloutEngineError", "RuntimeError"), results
        assert "clients" in msg or "engines" in msg or "engine refused" in msg, results
