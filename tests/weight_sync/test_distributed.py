"""Distributed (broadcast) and tensor weight sync into the embedded engine, for real, on CPU (gloo).

Each layout runs its whole scenario once (process start-up and imports dominate on CPU): the
1-rank one in this process, the 2-rank one in two spawned processes; the tests assert on what
it returns:
* 1 trainer rank: push -> every served weight is bit-identical to the exported HF tensors,
  generation changes, the version is tagged; per-tensor and flattened-bucket broadcasts;
  a bad name / shape is refused with a clear message and leaves the weights and the group
  intact; the tensor path (shared-memory payloads) gives the same bits.
* 2 trainer ranks (TP2 x EP2) push into one engine; a failed connect raises on both ranks.
"""

import time

import httpx
import pytest
import torch
from _dist import run_distributed
from ws_helpers import build_model, engine_state, fill_nan, greedy, mismatches, nan_params, new_loop

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")
pytestmark = pytest.mark.distributed

PROMPT = [3, 17, 42, 9, 100]


def _cfg(**kw):
    from megatron_vespo.weight_sync.config import WeightSyncConfig

    return WeightSyncConfig(**{"bucket_mb": 0.1, "init_timeout_s": 30, "op_timeout_s": 60, **kw})


def _one_rank(rank, world):
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.rollout.embedded.server import start_embedded_server
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync
    from megatron_vespo.weight_sync.tensor import TensorWeightSync

    out = {}
    model, hf_cfg = build_model()
    ref = export_hf_state_dict(model, hf_cfg)
    handle = start_embedded_server(preset="tiny", seed=7, mode="thread")
    loop, run = new_loop()
    client = SGLangClient(handle.url, timeout_s=60, max_retries=0)
    try:
        out["before"] = greedy(client, run, PROMPT)
        fill_nan(handle.engine)
        sync = DistributedWeightSync(hf_cfg, _cfg(flattened_bucket=False))  # one broadcast per tensor
        out["metrics"] = sync.push(model, 3, clients=[client], run=run)
        out["nan_after_push"] = nan_params(handle.engine)
        out["mismatch_after_push"] = mismatches(handle.engine, ref)
        out["n_ref"] = len(ref)
        out["after"] = greedy(client, run, PROMPT)
        out["version"] = run(client.weight_version())

        # bad buckets: refused after being received, nothing applied, the group still works
        kept = engine_state(handle.engine)["model.norm.weight"].clone()
        out["window_closed_after_push"] = not handle.engine.weight_window.is_open
        out["windows_opened"] = handle.engine.weight_window.opened
        # outside a window the engine refuses before receiving (sglang >= 0.5.21): the group is given up
        try:
            sync.send_bucket([("model.norm.weight", torch.full((64,), 5.0))], run, version=98)
            out["no_window"] = "no error"
        except Exception as exc:  # noqa: BLE001
            out["no_window"] = f"{type(exc).__name__}: {exc}"
        out["connected_after_no_window"] = sync.group is not None
        sync.connect([client], run)
        sync.open_windows(run)
        for key, bucket in (("bad_name", [("model.norm.weight", torch.full((64,), 5.0)),
                                          ("model.layers.0.mlp.experts.99.gate_proj.weight", torch.zeros(32, 64))]),
                            ("bad_shape", [("model.norm.weight", torch.zeros(3))]),
                            ("bad_nan", [("model.norm.weight", torch.full((64,), float("nan")))])):
            try:
                sync.send_bucket(bucket, run, version=99)
                out[key] = "no error"
            except Exception as exc:  # noqa: BLE001
                out[key] = f"{type(exc).__name__}: {exc}"
        sync.close_windows(run)
        out["norm_kept"] = torch.equal(engine_state(handle.engine)["model.norm.weight"], kept)
        out["version_after_bad"] = run(client.weight_version())
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        ref2 = export_hf_state_dict(model, hf_cfg)
        out["push2"] = sync.push(model, 4, clients=[client], run=run)
        out["mismatch_push2"] = mismatches(handle.engine, ref2)

        # flattened_bucket: one broadcast per bucket, through a new group (the old one is torn down first)
        sync.disconnect(run)
        flat = DistributedWeightSync(hf_cfg, _cfg())  # flattened_bucket is the default
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        ref3 = export_hf_state_dict(model, hf_cfg)
        out["flat"] = flat.push(model, 5, clients=[client], run=run)
        out["mismatch_flat"] = mismatches(handle.engine, ref3)
        flat.disconnect(run)

        # engine-side: nccl is refused with a clear 400
        try:
            run(client.init_weights_update_group("127.0.0.1", 1, 1, 2, "nope", backend="nccl"))
            out["nccl"] = "no error"
        except Exception as exc:  # noqa: BLE001
            out["nccl"] = f"{type(exc).__name__}: {exc}"

        # the tensor path (colocated; here CPU shared memory): same bits
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.0)
        ref4 = export_hf_state_dict(model, hf_cfg)
        opened = handle.engine.weight_window.opened
        tensor = TensorWeightSync(hf_cfg, _cfg())
        out["tensor"] = tensor.push(model, 6, clients=[client], run=run)
        out["tensor_windows"] = (handle.engine.weight_window.opened - opened, handle.engine.weight_window.is_open)
        out["mismatch_tensor"] = mismatches(handle.engine, ref4)
        out["version_tensor"] = run(client.weight_version())
        # later syncs refill the same shared-memory buffers (staging.py): the engine must see the new bits
        allocated = tensor.staging.allocations
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25)
        ref5 = export_hf_state_dict(model, hf_cfg)
        tensor.push(model, 7, clients=[client], run=run)
        out["mismatch_tensor2"] = mismatches(handle.engine, ref5)
        # the deferred load's split: stage (collective) then send (rank 0, no collectives)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        ref6 = export_hf_state_dict(model, hf_cfg)
        staged = tensor.stage(model, clients=[client], run=run)
        out["mismatch_staged_unsent"] = len(mismatches(handle.engine, ref6))  # staging alone changes nothing
        order = []  # pause before the window opens, continue after it closed (slime / miles order)
        out["send"] = tensor.send(
            staged, 8, [client], run,
            pause=lambda: order.append(("pause", handle.engine.weight_window.is_open, run(client.pause_generation()))),
            resume=lambda: order.append(("continue", handle.engine.weight_window.is_open,
                                         run(client.continue_generation()))))
        out["send_order"] = [(what, was_open) for what, was_open, _ in order]
        out["mismatch_tensor3"] = mismatches(handle.engine, ref6)
        out["version_tensor3"] = run(client.weight_version())
        out["tensor_allocations"] = (allocated, tensor.staging.allocations, out["tensor"]["weight_sync/buckets"])
        out["tensor_window_open_after_send"] = handle.engine.weight_window.is_open
        # one process: the next stagings are the cached view plan (one foreach copy); then a parameter
        # given new storage (as a load that replaces .data would) drops the plan for a full staging
        out["plan_built"] = tensor._plan is not None
        for step, replace in ((9, False), (10, True)):
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    p.add_(0.125 * (i % 3 - 1))
            if replace:
                first = next(model.parameters())
                first.data = first.data.clone() * 2.0
            ref = export_hf_state_dict(model, hf_cfg)
            fast = tensor._plan is not None and tensor._plan.valid(tensor.staging)
            tensor.send(tensor.stage(model, clients=[client], run=run), step, [client], run)
            out[f"plan_{step}"] = (fast, mismatches(handle.engine, ref), tensor.staging.allocations)
    finally:
        run(client.aclose())
        handle.stop()
        loop.close()
    return out


@pytest.fixture(scope="module")
def one_rank(parallel_teardown_module):
    # in this process (a spawn would cost more than the scenario); Megatron's state and the
    # environment are restored after the module by the shared fixture (tests/conftest.py)
    return _one_rank(0, 1)


def test_push_makes_engine_weights_bit_identical(one_rank):
    r = one_rank
    assert r["nan_after_push"] == []  # every served parameter was written
    assert r["mismatch_after_push"] == [] and r["n_ref"] > 50
    assert r["metrics"]["weight_sync/buckets"] > 1  # several buckets: version and flush on the last one only
    assert r["metrics"]["weight_sync/bytes"] > 0


def test_generation_changes_and_version_is_tagged(one_rank):
    r = one_rank
    assert r["before"][0] != r["after"][0] or r["before"][1] != r["after"][1]
    assert r["version"] == "3" and r["after"][2] == 3


def test_push_opens_and_closes_the_update_window(one_rank):
    """sglang 0.5.21-0.5.23 refuse update_weights_from_distributed outside begin/end_weight_update."""
    r = one_rank
    assert r["window_closed_after_push"] and r["windows_opened"] == 1
    assert "must run between begin_weight_update() and end_weight_update()" in r["no_window"], r["no_window"]
    assert not r["connected_after_no_window"]  # the engine never received: the broadcast was abandoned


def test_bad_name_and_shape_are_refused_and_change_nothing(one_rank):
    r = one_rank
    assert "not in the served model" in r["bad_name"] and "experts.99.gate_proj" in r["bad_name"]
    assert "shape mismatch" in r["bad_shape"] and "model.norm.weight" in r["bad_shape"]
    assert "NaN or inf" in r["bad_nan"] and "model.norm.weight" in r["bad_nan"]  # a poisoned broadcast
    assert r["norm_kept"]  # the valid half of the bad bucket was not applied
    assert r["version_after_bad"] == "3"
    assert r["mismatch_push2"] == []  # the group survived the refused buckets
    assert r["push2"]["weight_sync/connect_s"] == 0.0  # ... and was reused


def test_flattened_bucket_and_tensor_paths(one_rank):
    r = one_rank
    assert r["mismatch_flat"] == [] and r["flat"]["weight_sync/connect_s"] > 0
    assert "nccl" in r["nccl"] and "400" in r["nccl"]
    assert r["mismatch_tensor"] == [] and r["version_tensor"] == "6"
    assert r["tensor_windows"] == (1, False)  # one window around the tensor push, closed after it


def test_tensor_path_reuses_its_shared_memory_buffers_and_the_engine_sees_each_new_version(one_rank):
    r = one_rank
    allocated, after, buckets = r["tensor_allocations"]
    assert buckets > 1 and allocated == after == buckets  # one buffer per bucket, allocated once for 3 syncs
    assert r["mismatch_tensor2"] == [] and r["mismatch_tensor3"] == []
    assert r["mismatch_staged_unsent"] > 0  # the engine changed only when the staged buckets were sent
    assert r["version_tensor3"] == "8" and not r["tensor_window_open_after_send"]
    assert r["send"]["weight_sync/buckets"] == buckets and r["send"]["weight_sync/bytes"] > 0
    assert r["send_order"] == [("pause", False), ("continue", False)]  # the window lay inside the pause
    assert r["send"]["time/engines_paused_s"] == r["send"]["weight_sync/load_s"] > 0


def test_one_process_staging_through_the_view_plan_gives_the_engine_the_same_bits(one_rank):
    r = one_rank
    buckets = r["tensor_allocations"][2]
    assert r["plan_built"]
    assert r["plan_9"] == (True, [], buckets)  # the plan's copy: same buffers, same bits as the export
    assert r["plan_10"] == (False, [], buckets)  # a parameter with new storage: full staging, still exact


def _two_ranks(rank, world):
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict
    from megatron_vespo.rollout.client import RolloutEngineError, SGLangClient
    from megatron_vespo.rollout.embedded.server import start_embedded_server
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync

    model, hf_cfg = build_model(tp=2, ep=2)
    ref = export_hf_state_dict(model, hf_cfg)
    out, handle, client, loop, run = {}, None, None, None, None
    if rank == 0:
        handle = start_embedded_server(preset="tiny", seed=7, mode="thread")
        loop, run = new_loop()
        client = SGLangClient(handle.url, timeout_s=60, max_retries=0)
        fill_nan(handle.engine)
    try:
        out["metrics"] = DistributedWeightSync(hf_cfg, _cfg()).push(
            model, 1, clients=[client] if rank == 0 else None, run=run)
        if rank == 0:
            out["nan"] = nan_params(handle.engine)
            out["mismatch"] = mismatches(handle.engine, ref)
            out["version"] = run(client.weight_version())
        # rank 0 cannot reach its engine: both ranks must raise (not hang in the export's collectives)
        dead = SGLangClient("http://127.0.0.1:9", timeout_s=5, max_retries=0) if rank == 0 else None
        try:
            DistributedWeightSync(hf_cfg, _cfg()).push(model, 2, clients=[dead] if rank == 0 else None, run=run)
            out["dead"] = "no error"
        except RolloutEngineError as exc:
            out["dead"] = str(exc)
        if dead is not None:
            run(dead.aclose())
    finally:
        if rank == 0:
            run(client.aclose())
            handle.stop()
            loop.close()
    return out


def test_two_trainer_ranks_tp2_ep2_push_to_one_engine():
    r0, r1 = run_distributed(_two_ranks, 2, timeout=240)
    assert r0["nan"] == [] and r0["mismatch"] == [] and r0["version"] == "1"
    assert r1["metrics"]["weight_sync/bytes"] == 0  # only rank 0 sends
    for r in (r0, r1):
        assert "127.0.0.1:9" in r["dead"], r["dead"]


def test_unreachable_engine_is_named():
    from ws_helpers import new_loop as _new_loop

    from megatron_vespo.rollout.client import EngineUnreachableError, SGLangClient
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync

    loop, run = _new_loop()
    client = SGLangClient("http://127.0.0.1:9", timeout_s=5, max_retries=0)
    sync = DistributedWeightSync({"model_type": "qwen3_moe", "num_attention_heads": 4, "hidden_size": 64,
                                  "num_hidden_layers": 1, "num_experts": 2, "vocab_size": 16,
                                  "moe_intermediate_size": 8, "intermediate_size": 8}, _cfg())
    with pytest.raises(EngineUnreachableError, match="127.0.0.1:9"):
        sync.connect([client], run)
    assert sync.group is None
    run(client.aclose())
    loop.close()


def test_group_init_timeout_is_bounded():
    """An engine that accepts /init_weights_update_group but never joins: TimeoutError after init_timeout_s."""
    from ws_helpers import new_loop as _new_loop

    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync

    def handler(request):
        if request.url.path == "/server_info":
            return httpx.Response(200, json={"tp_size": 1})
        return httpx.Response(200, json={"success": True, "message": "ok"})

    loop, run = _new_loop()
    client = SGLangClient("http://fake-engine:30000", transport=httpx.MockTransport(handler), max_retries=0)
    cfg = _cfg(init_timeout_s=2.0)
    sync = DistributedWeightSync({"model_type": "qwen3_moe", "num_attention_heads": 4, "hidden_size": 64,
                                  "num_hidden_layers": 1, "num_experts": 2, "vocab_size": 16,
                                  "moe_intermediate_size": 8, "intermediate_size": 8}, cfg)
    cfg_addr = sync.cfg.model_copy(update={"master_address": "127.0.0.1"})
    sync.cfg = cfg_addr
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not form within 2.0s"):
        sync.connect([client], run)
    assert time.monotonic() - t0 < 15
    run(client.aclose())
    loop.close()
