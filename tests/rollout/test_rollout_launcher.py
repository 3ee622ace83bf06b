"""SGLang launcher: command construction, lifecycle against a fake server, and (GPU) a real SGLang."""

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_vespo.config.base import ConfigError, validate
from megatron_vespo.rollout.config import RolloutConfig, SamplingConfig
from megatron_vespo.rollout.process import AttachedServer, ServerProcess, check_health, find_free_port
from megatron_vespo.rollout.sglang_server import (
    attach_servers,
    build_sglang_command,
    launch_sglang_servers,
    server_args_to_flags,
)

FAKE = [sys.executable, str(Path(__file__).with_name("fake_sglang_server.py"))]


def test_command_from_config():
    cfg = RolloutConfig(engine="sglang", model_path="/models/qwen3-30b-a3b", tp_size=4, return_routed_experts=True,
                        server_args={"mem_fraction_static": 0.7, "enable_metrics": True, "disable_radix_cache": False,
                                     "cuda_graph_bs": [1, 2, 4], "json_model_override_args": {"a": 1}})
    cmd = build_sglang_command(cfg, 30010, python="/py")
    assert cmd == ["/py", "-m", "sglang.launch_server", "--model-path", "/models/qwen3-30b-a3b",
                   "--host", "127.0.0.1", "--port", "30010", "--tp-size", "4", "--enable-return-routed-experts",
                   "--mem-fraction-static", "0.7", "--enable-metrics", "--cuda-graph-bs", "1", "2", "4",
                   "--json-model-override-args", '{"a": 1}']
    cfg.return_routed_experts = False
    assert "--enable-return-routed-experts" not in build_sglang_command(cfg, 1)
    with pytest.raises(ValueError, match="model_path"):
        build_sglang_command(RolloutConfig(engine="sglang"), 1)
    with pytest.raises(ValueError, match="empty list"):
        server_args_to_flags({"cuda_graph_bs": []})


def test_server_args_may_not_shadow_rollout_fields():
    with pytest.raises(ConfigError, match="server_args sets \\['port', 'tp_size'\\]"):
        validate(RolloutConfig, {"server_args": {"tp-size": 2, "port": 1}})


def _fake_cfg(tmp_path, n=1):
    return RolloutConfig(engine="sglang", model_path=str(tmp_path / "model"), num_engines=n,
                         base_port=find_free_port(), launch_timeout_s=20, return_routed_experts=True,
                         server_args={"mem_fraction_static": 0.5})


def test_launch_health_and_stop_fake_servers(tmp_path):
    cfg = _fake_cfg(tmp_path)
    argv_file = tmp_path / "argv.json"
    servers = launch_sglang_servers(cfg, log_dir=str(tmp_path / "logs"), launcher=FAKE,
                                    env={"FAKE_SGLANG_ARGV_FILE": str(argv_file)})
    try:
        (s,) = servers
        assert s.alive() and check_health(s.url)
        assert json.loads(argv_file.read_text()) == build_sglang_command(cfg, cfg.base_port, launcher=FAKE)[2:]
        assert "fake sglang starting" in s.log_tail()
        attached = attach_servers([s.url], timeout_s=5)[0]
        attached.stop()  # attach mode never kills what it does not own
        assert s.alive()
    finally:
        for s in servers:
            s.stop()
    assert not servers[0].alive() and not check_health(servers[0].url)


def test_stop_kills_the_servers_process_group(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    port = find_free_port()
    proc = ServerProcess(FAKE + ["--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}",
                         tmp_path / "s.log", env={"FAKE_SGLANG_MODE": "spawn", "FAKE_SGLANG_PIDFILE": str(pidfile)})
    with proc.start().wait_healthy(20, interval_s=0.1):
        grandchild = int(pidfile.read_text())
        os.kill(grandchild, 0)  # alive
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        try:  # reap if it became our zombie (it is not our child, so this usually raises)
            os.waitpid(grandchild, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    else:
        pytest.fail("grandchild of the server survived stop()")


def test_startup_failure_reports_log_tail(tmp_path):
    cfg = _fake_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="(?s)exited with code 3.*CUDA not available"):
        launch_sglang_servers(cfg, log_dir=str(tmp_path), launcher=FAKE, env={"FAKE_SGLANG_MODE": "exit"})


def test_health_timeout_stops_the_server(tmp_path):
    port = find_free_port()
    proc = ServerProcess(FAKE + ["--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}",
                         tmp_path / "s.log", env={"FAKE_SGLANG_MODE": "nohealth"}).start()
    with pytest.raises(TimeoutError, match="not healthy after 1.5s"):
        proc.wait_healthy(1.5, interval_s=0.1)
    assert not proc.alive()
    with pytest.raises(TimeoutError, match="attach mode"):
        AttachedServer(f"http://127.0.0.1:{find_free_port()}").wait_healthy(0.3, interval_s=0.1)
    with pytest.raises(ValueError, match="attach"):
        launch_sglang_servers(RolloutConfig(urls=["http://x:1"], model_path="m"))


@pytest.mark.gpu
def test_real_sglang_rollout_matches_hf_rescoring(tmp_path):
    """Real SGLang on a tiny random Qwen3-MoE: protocol, R3 routes and mu vs an HF re-score.

    bf16 on GPU, so log-probs agree to ~5e-2 and a few near-tie routes may differ.
    """
    pytest.importorskip("sglang")
    from megatron_vespo.rollout.client import SGLangClient
    from megatron_vespo.rollout.embedded.capture import RouterCapture
    from megatron_vespo.rollout.embedded.models import load_hf_model, save_tiny_checkpoint
    from megatron_vespo.rollout.routes import RouteSpec
    from megatron_vespo.types import SampleStatus

    # head_dim 64 / hidden 256: shapes every SGLang attention backend supports
    ckpt = save_tiny_checkpoint(tmp_path / "tiny", hidden_size=256, head_dim=64, num_attention_heads=4,
                                num_key_value_heads=2, dtype="bfloat16")
    cfg = RolloutConfig(engine="sglang", model_path=str(ckpt), base_port=find_free_port(),
                        return_routed_experts=True, launch_timeout_s=600,
                        server_args={"skip_tokenizer_init": True, "mem_fraction_static": 0.3,
                                     "disable_cuda_graph": True, "random_seed": 0})
    servers = launch_sglang_servers(cfg, log_dir=str(tmp_path / "logs"))
    spec = RouteSpec.from_hf_config(ckpt)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    try:
        async def go():
            async with SGLangClient(servers[0].url, route_spec=spec, return_routed_experts=True) as c:
                samples = await c.generate_batch(prompts, SamplingConfig(temperature=0.8, max_new_tokens=16), 2)
                await c.update_weights_from_disk(str(ckpt), policy_version=1)
                return samples, await c.weight_version()
        samples, version = asyncio.run(go())
    finally:
        for s in servers:
            s.stop()
    assert version == "1"
    model = load_hf_model(ckpt, "bfloat16")
    cap = RouterCapture(model)
    for s in samples:
        assert s.status in (SampleStatus.COMPLETED, SampleStatus.TRUNCATED), s.metadata
        cap.start()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s.tokens])).logits[0].float()
        routes = cap.collect(1, len(s.tokens))[0, :-1]
        p = len(s.prompt_tokens)
        ref = torch.log_softmax(logits[p - 1:-1] / 0.8, -1).gather(-1, torch.tensor(s.response_tokens)[:, None])[:, 0]
        assert torch.allclose(s.rollout_log_probs, ref, atol=5e-2)
        same = (s.routed_experts.long().sort(-1).values == routes.long().sort(-1).values).all(-1).float().mean()
        assert same > 0.95
