"""GPU-only halves of the fast weight-sync paths (skipped on CPU machines).

* NCCL: training rank 0 (``TrainerGroup``, cuda:0) broadcasts to a process that joins exactly as
  SGLang's ``init_custom_process_group`` does (cuda:1): needs 2 GPUs.
* CUDA IPC: a flattened bucket serialized as ``update_weights_from_tensor`` sends it is opened in
  another process (what a colocated SGLang engine does) and holds the same bits.
"""

import multiprocessing as mp

import pytest
import torch

pytestmark = pytest.mark.gpu


def _nccl_engine(port, world, q):
    from datetime import timedelta

    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world
    from torch.distributed.rendezvous import rendezvous

    torch.cuda.set_device(1)
    timeout = timedelta(seconds=60)
    store, _, _ = next(rendezvous(f"tcp://127.0.0.1:{port}", 1, world, timeout=timeout))
    pg, _ = _new_process_group_helper(world, 1, [], Backend("nccl"), PrefixStore("weight_update_group", store),
                                      group_name="weight_update_group", timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}
    x = torch.empty(1000, dtype=torch.bfloat16, device="cuda")
    torch.distributed.broadcast(x, group_src=0, group=pg)
    q.put(x.float().sum().item())


def test_nccl_trainer_group_reaches_an_sglang_style_rank():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (NCCL refuses two ranks on one device)")
    from megatron_vespo.weight_sync.group import TrainerGroup

    torch.cuda.set_device(0)
    group = TrainerGroup("nccl", 2, master_address="127.0.0.1", init_timeout_s=60, op_timeout_s=60)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_nccl_engine, args=(group.port, 2, q))
    p.start()
    group.connect()
    x = torch.arange(1000, device="cuda").to(torch.bfloat16)
    group.wait(group.broadcast([x]))
    assert q.get(timeout=120) == x.float().sum().item()
    p.join(timeout=60)
    group.close()


def _ipc_engine(payload, q):
    from megatron_vespo.rollout.embedded.weight_update import deserialize_named_tensors

    named = deserialize_named_tensors(payload, "flattened_bucket")
    q.put({n: t.cpu() for n, t in named})


def test_cuda_ipc_payload_opens_in_another_process():
    from megatron_vespo.weight_sync.tensor import serialize
    from megatron_vespo.wire import flattened_bucket

    named = [("a", torch.randn(64, 32, device="cuda")), ("b", torch.randn(17, device="cuda").to(torch.bfloat16))]
    data = flattened_bucket(named)  # kept alive until the other process has read it
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_ipc_engine, args=(serialize(data), q))
    p.start()
    got = q.get(timeout=120)
    p.join(timeout=60)
    assert all(torch.equal(got[n], t.cpu()) for n, t in named)
