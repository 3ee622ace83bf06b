"""Transformer Engine spec (fused norms, TEGroupedMLP ``linear_fc1.weight{j}`` names): GPU only."""

import json

import pytest
import torch
from tiny_hf import make_tiny_hf


@pytest.mark.gpu
def test_te_spec_round_trip_and_logit_parity(tmp_path):
    pytest.importorskip("transformer_engine")
    from megatron_vespo.checkpoint.convert import compare_with_transformers, parallel_config
    from megatron_vespo.checkpoint.hf_dir import HFCheckpointReader
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict, load_hf_weights, local_params
    from megatron_vespo.checkpoint.mapping import Qwen3MoeDims
    from megatron_vespo.models.config import ModelConfig
    from megatron_vespo.models.qwen3_moe import build_gpt_model, get_hf_config
    from megatron_vespo.train.parallel import destroy_parallel, init_parallel

    hf = make_tiny_hf(tmp_path / "hf", mlp_only_layers=[0])
    dims = Qwen3MoeDims.from_hf_config(json.loads((hf / "config.json").read_text()))
    parallel = parallel_config()
    init_parallel(parallel)
    try:
        model = build_gpt_model(get_hf_config(ModelConfig(preset=None, hf_path=str(hf))), parallel, use_te=True)
        names = [lp.local_name for lp in local_params(model, dims)]
        assert any(n.endswith("linear_qkv.layer_norm_weight") for n in names)  # TE fused input norm
        reader = HFCheckpointReader(hf)
        load_hf_weights(model, reader, dims)
        exported = export_hf_state_dict(model, dims)
        assert all(torch.equal(exported[k].cpu(), reader.get(k)) for k in reader.keys())
        assert compare_with_transformers(model, hf, dims) < 1e-4  # TE kernels (TF32 off by default)
    finally:
        destroy_parallel(destroy_process_group=True)
