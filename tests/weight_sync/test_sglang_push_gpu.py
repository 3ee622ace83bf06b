"""The real push path against a real SGLang server (GPU only; skipped on CPU machines).

Needs 2 GPUs and sglang installed: the trainer (one Megatron process) broadcasts from cuda:0 over
NCCL, one SGLang server (``--base-gpu-id 1``) receives. What runs is exactly what a job runs:
``DistributedWeightSync.push`` (EngineChannel HTTP thread, CollectiveThread broadcasts, NCCL's
communicator formed inside the first broadcast) with ``/begin_weight_update`` and
``/end_weight_update`` around it on sglang >= 0.5.21, then ``send_bucket`` outside and inside a
window. Weights are read back with SGLang's ``/get_weights_by_name``.
"""

import asyncio

import pytest
import torch

pytestmark = pytest.mark.gpu

# head_dim 64 and hidden 256: sizes SGLang's attention kernels accept (the CPU tiny model has head_dim 16)
OVERRIDES = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
             "moe_intermediate_size": 128, "intermediate_size": 512, "vocab_size": 1024}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: the trainer on cuda:0, the SGLang server on cuda:1 (NCCL refuses one device)")
    pytest.importorskip("sglang", reason="needs sglang installed (pip install 'sglang[all]')")
    from megatron_vespo.checkpoint.hf_dir import save_hf_checkpoint
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.rollout.config import RolloutConfig
    from megatron_vespo.rollout.sglang_server import launch_sglang_servers
    from megatron_vespo.train.config import ParallelConfig
    from megatron_vespo.train.parallel import destroy_parallel, init_parallel

    torch.cuda.set_device(0)
    parallel = ParallelConfig()
    init_parallel(parallel, seed=0)
    hf_cfg = get_hf_config(ModelConfig(preset="tiny", hf_overrides=OVERRIDES))
    model = build_gpt_model(hf_cfg, parallel, params_dtype="bfloat16")
    out = tmp_path_factory.mktemp("sglang_push")
    start = save_hf_checkpoint(model, hf_cfg, out / "start", dtype="bfloat16")
    cfg = RolloutConfig(engine="sglang", model_path=str(start), num_engines=1, tp_size=1, launch_timeout_s=600,
                        server_args={"base_gpu_id": 1, "mem_fraction_static": 0.3, "skip_tokenizer_init": True,
                                     "disable_cuda_graph": True, "attention_backend": "triton"})
    servers = launch_sglang_servers(cfg, log_dir=str(out / "logs"))
    loop = asyncio.new_event_loop()
    client = SGLangClient(servers[0].url, timeout_s=300, max_retries=0)
    try:
        yield {"model": model, "hf_cfg": hf_cfg, "client": client, "run": loop.run_until_complete,
               "export": lambda: export_hf_state_dict(model, hf_cfg, dtype=torch.bfloat16)}
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        for s in servers:
            s.stop()
        destroy_parallel(destroy_process_group=True)


def _served(s, name, n=4):
    got = s["run"](s["client"].request("POST", "/get_weights_by_name", json={"name": name, "truncate_size": n}))
    return torch.tensor(got, dtype=torch.float32)


def _cfg(**kw):
    from megatron_vespo.weight_sync.config import WeightSyncConfig

    return WeightSyncConfig(**{"backend": "nccl", "dtype": "bfloat16", "bucket_mb": 1, "init_timeout_s": 120,
                               "op_timeout_s": 120, **kw})


@pytest.mark.parametrize("flattened", [True, False])
def test_push_reaches_sglang_and_tags_the_version(setup, flattened):
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync

    s = setup
    with torch.no_grad():
        for p in s["model"].parameters():
            p.mul_(1.25)
    ref = s["export"]()
    version = 11 if flattened else 12
    sync = DistributedWeightSync(s["hf_cfg"], _cfg(flattened_bucket=flattened))
    try:
        m = sync.push(s["model"], version, clients=[s["client"]], run=s["run"])
    finally:
        sync.disconnect(s["run"])
    assert m["weight_sync/buckets"] > 1
    assert s["run"](s["client"].weight_version()) == str(version)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        want = ref[name][:4].float()
        assert torch.equal(_served(s, name).reshape(want.shape), want), name


def test_send_bucket_is_refused_outside_the_window_and_loads_inside(setup):
    from megatron_vespo.rollout.client import RolloutEngineError, parse_version
    from megatron_vespo.weight_sync.distributed import DistributedWeightSync

    s = setup
    info = s["run"](s["client"].server_info())
    if (parse_version(info.get("version")) or (0, 0, 0)) < (0, 5, 21):
        pytest.skip(f"sglang {info.get('version')} has no weight-update window (added in 0.5.21)")
    sync = DistributedWeightSync(s["hf_cfg"], _cfg())
    ones = [("model.norm.weight", torch.ones(OVERRIDES["hidden_size"], dtype=torch.bfloat16, device="cuda"))]
    try:
        sync.connect([s["client"]], s["run"])
        with pytest.raises(RolloutEngineError, match=r"must run between begin_weight_update\(\)"):
            sync.send_bucket(ones, s["run"])
        sync.connect([s["client"]], s["run"])  # the refused bucket's broadcast was abandoned with its group
        sync.open_windows(s["run"])
        sync.send_bucket(ones, s["run"], version=21, flush_cache=True)
        sync.close_windows(s["run"])
    finally:
        sync.disconnect(s["run"])
    assert torch.equal(_served(s, "model.norm.weight"), torch.ones(4))
    assert s["run"](s["client"].weight_version()) == "21"
