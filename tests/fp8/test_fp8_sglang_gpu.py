"""An SGLang server loads the block-FP8 export (``convert mcore-to-hf --fp8-blockwise``) and a later
FP8 update from disk (GPU + sglang only; skipped here with the reason).

Run: ``pytest -m gpu tests/fp8/test_fp8_sglang_gpu.py`` on a Hopper/Blackwell node with sglang installed.
The model has every GEMM dimension a multiple of 128 (SGLang's block check at TP 1: merged qkv
partitions, gate_up, experts). SGLang serves the FP8 weights and quantises activations per 1x128
group on the fly; the embedded engine serves the same dequantised weights in FP32 without
activation quantisation, so greedy tokens agree and log-probs differ by activation rounding only.
"""

import asyncio
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))

DIMS = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=256)
PROMPT = [5, 17, 42, 9, 100, 7, 3]


def _generate(url: str, n: int = 8):
    from megatron_vespo.rollout.client import SGLangClient

    async def go():
        client = SGLangClient(url, timeout_s=120, max_retries=0)
        try:
            s = await client.generate(PROMPT, {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True})
        finally:
            await client.aclose()
        return list(s.response_tokens), [float(x) for x in s.rollout_log_probs]
    return asyncio.run(go())


def test_sglang_serves_and_reloads_the_fp8_export(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("sglang", reason="needs sglang installed (pip install 'sglang[all]')")
    from tiny_hf import make_tiny_hf

    from megatron_vespo.cli import main
    from megatron_vespo.rollout.config import RolloutConfig
    from megatron_vespo.rollout.embedded.server import start_embedded_server
    from megatron_vespo.rollout.sglang_server import launch_sglang_servers

    hf = make_tiny_hf(tmp_path / "hf", max_shard_size="5MB", **DIMS)
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc")]) == 0
    assert main(["convert", "mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "fp8"),
                 "--fp8-blockwise"]) == 0
    cfg = RolloutConfig(engine="sglang", model_path=str(tmp_path / "fp8"), base_port=31200, launch_timeout_s=900,
                        server_args={"mem_fraction_static": 0.3, "disable_cuda_graph": True})
    servers = launch_sglang_servers(cfg, log_dir=str(tmp_path / "logs"))
    ref = start_embedded_server(str(tmp_path / "fp8"), mode="thread")
    try:
        tokens, lps = _generate(servers[0].url)
        ref_tokens, ref_lps = _generate(ref.url)
        assert tokens[:4] == ref_tokens[:4]
        assert max(abs(a - b) for a, b in zip(lps[:4], ref_lps[:4])) < 0.1
        # an update from disk into the FP8 engine (a second export of the same checkpoint: same tokens after)
        assert main(["convert", "mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "fp8b"),
                     "--fp8-blockwise"]) == 0
        from megatron_vespo.rollout.client import SGLangClient

        async def update():
            c = SGLangClient(servers[0].url, timeout_s=300, max_retries=0)
            try:
                await c.update_weights_from_disk(str(tmp_path / "fp8b"), 1)
            finally:
                await c.aclose()
        asyncio.run(update())
        assert _generate(servers[0].url)[0][:4] == tokens[:4]  # same weights, same greedy tokens
    finally:
        ref.stop()
        for s in servers:
            s.stop()
