"""Rank 0's batch reaches every rank as tensors: compact routes, each DP rank only its own rows.

The regression: ``broadcast_from_rank0`` pickled the whole ``TrainBatch`` (int64 routes
[B, S, L, K]) with ``broadcast_object_list``, so every rank received every row's routes at
8 bytes per id -- 14.5 GB for the 30B EP8 config. Here no pickle may carry a tensor, routes
arrive as uint8 and a DP rank holds only the rows it trains on; training is unchanged.
"""

import pickle

import pytest
import torch
from _dist import run_distributed

from megatron_vespo.routing.compact import RouteRows, decode_routes, encode_routes
from megatron_vespo.routing.routes import NO_ROUTE

B, S, L, K, E, MINI = 8, 64, 8, 4, 16, 4


def _batch(seed=0):
    from megatron_vespo.train.synthetic import synthetic_batch

    return synthetic_batch(B, S, 100, seed=seed, num_moe_layers=L, topk=K, num_experts=E)


# ---------------------------------------------------------------- pure
def test_compact_round_trip():
    r = torch.randint(0, 128, (3, 5, 2, 4))
    r[0, 3:] = NO_ROUTE
    c = encode_routes(r)
    assert c.dtype == torch.uint8 and torch.equal(decode_routes(c), r)
    r[1, 0, 0, 0] = 300
    c = encode_routes(r)
    assert c.dtype == torch.int16 and torch.equal(decode_routes(c), r)
    with pytest.raises(ValueError, match="does not fit uint8"):
        encode_routes(r, torch.uint8)


def test_route_rows_index_by_global_row():
    r = torch.randint(0, E, (B, S, L, K))
    rows = torch.tensor([2, 3, 6, 7])
    rr = RouteRows(rows, encode_routes(r)[rows], B)
    assert rr.shape == r.shape and rr.dim() == 4
    assert torch.equal(rr[torch.tensor([7, 2])], r[[7, 2]])
    with pytest.raises(KeyError, match=r"rows \[0\] are not held"):
        rr[torch.tensor([0, 2])]


def test_shard_rows_are_the_rows_batching_gives_the_rank():
    from megatron_vespo.orchestration.batch_transfer import dp_shard_rows
    from megatron_vespo.train import batching

    batch = _batch()
    for dp in (1, 2, 4):
        for d in range(dp):
            want = torch.cat([mb.rows for k in range(B // MINI)
                              for mb in batching.rank_micro_batches(batch, batching.mini_batch_rows(B, MINI, k),
                                                                    dp_rank=d, dp_size=dp, micro_batch_size=1)])
            assert torch.equal(dp_shard_rows(B, MINI, dp, d), want)


# ---------------------------------------------------------------- 2 gloo ranks
def _transfer(rank, world_size):
    from megatron_vespo.orchestration import setup
    from megatron_vespo.orchestration.batch_transfer import BatchLayout, last_stats

    pickled = []
    real = torch.distributed.broadcast_object_list

    def spy(objs, *a, **k):
        pickled.append(len(pickle.dumps(objs)))
        return real(objs, *a, **k)

    torch.distributed.broadcast_object_list = spy
    try:
        layout = BatchLayout(dp_rank=rank, dp_size=2, mini_batch_size=MINI)  # DP 2, default group
        batch = _batch() if rank == 0 else None
        got, state = setup.broadcast_from_rank0(batch, {"pos": 3} if rank == 0 else None, None, layout=layout)
    finally:
        torch.distributed.broadcast_object_list = real
    ref = _batch()
    return {"pickled": pickled, "state": state, "stats": dict(last_stats), "routes_type": type(got.routed_experts),
            "routes_dtype": got.routed_experts.data.dtype, "rows": got.routed_experts.rows,
            "routes_ok": torch.equal(got.routed_experts[got.routed_experts.rows], ref.routed_experts[
                got.routed_experts.rows]),
            "fields_ok": all(torch.equal(getattr(got, f), getattr(ref, f))
                             for f in ("tokens", "loss_mask", "attention_lengths", "advantages"))}


def test_dp_ranks_receive_tensors_and_only_their_compact_routes():
    _check_transfer(run_distributed(_transfer, 2, timeout=120))


def _transfer_nccl(rank, world_size):
    torch.cuda.set_device(rank)
    torch.distributed.init_process_group("nccl", rank=rank, world_size=world_size)
    try:
        return _transfer(rank, world_size)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.gpu
def test_dp_transfer_over_nccl():
    """The same transfer through NCCL (CUDA staging buffers, byte views of uint8 routes)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    _check_transfer(run_distributed(_transfer_nccl, 2, timeout=300, init_gloo=False))


def _check_transfer(out):
    full_int64 = B * S * L * K * 8
    for rank, r in enumerate(out):
        assert r["state"] == {"pos": 3}
        assert max(r["pickled"]) < full_int64 // 8, "a pickle carried the batch"
        assert r["routes_type"] is RouteRows and r["routes_dtype"] == torch.uint8
        want = torch.cat([torch.arange(k * MINI + rank * MINI // 2, k * MINI + (rank + 1) * MINI // 2)
                          for k in range(B // MINI)])
        assert torch.equal(r["rows"], want)
        assert r["stats"]["routes_bytes"] == B // 2 * S * L * K  # 1 byte per id, half the rows: 16x less
        assert r["routes_ok"] and r["fields_ok"]


def _train_both_ways(rank, world_size, layout):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from actor_cases import make_actor, make_batch

    from megatron_vespo.orchestration.setup import broadcast_from_rank0
    from megatron_vespo.train.parallel import destroy_parallel

    out = {}
    actor = make_actor(layout, routing="R3")
    full = make_batch(actor)
    out["full"] = [(m["loss"], m["grad_norm"]) for m in actor.train_on_rollout(full)]
    actor = make_actor(layout, routing="R3")  # same layout-invariant weights again
    got, _ = broadcast_from_rank0(make_batch(actor) if rank == 0 else None, None, None, actor=actor)
    out["held_rows"] = got.routed_experts.rows.numel()
    out["sent"] = [(m["loss"], m["grad_norm"]) for m in actor.train_on_rollout(got)]
    bad = make_batch(actor)
    bad.routed_experts[5, 0, 0, :] = 0  # same expert twice: only rank 0 holds the whole batch to see it
    try:
        broadcast_from_rank0(bad if rank == 0 else None, None, None, actor=actor)
        out["bad"] = None
    except ValueError as exc:
        out["bad"] = str(exc)
    destroy_parallel()
    return out


@pytest.mark.parametrize("layout,rows", [({}, 4), ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, 8)],
                         ids=["dp2", "tp2"])
def test_training_on_the_transferred_batch_is_unchanged(layout, rows):
    pytest.importorskip("megatron.core")
    if torch.cuda.is_available():
        pytest.skip("CPU test")
    out = run_distributed(_train_both_ways, 2, layout, timeout=300)
    for r in out:
        assert r["held_rows"] == rows  # DP2: half the rows; TP2: one replica, all rows
        assert r["sent"] == r["full"]
        assert r["bad"] is not None and "sample 5" in r["bad"]
