"""Checkpointer: start from a Hugging Face directory, scheduled saves + HF exports, auto-resume."""

import pytest
import torch
from tiny_hf import make_tiny_hf

from megatron_vespo.checkpoint.config import CheckpointConfig
from megatron_vespo.config.base import ConfigError, validate


def test_config_requires_save_dir_when_saving():
    with pytest.raises(ConfigError, match="checkpoint.save_dir must be set"):
        validate(CheckpointConfig, {"save_interval": 10}, "job.yaml")
    assert CheckpointConfig(save_dir="/x", save_interval=5).hf_export_dtype == "bfloat16"


def test_checkpointer_loads_hf_saves_exports_and_resumes(tmp_path):
    pytest.importorskip("megatron.core")
    import json

    from megatron_vespo.checkpoint.checkpointer import Checkpointer, classify_checkpoint
    from megatron_vespo.checkpoint.convert import conversion_model, parallel_config
    from megatron_vespo.checkpoint.hf_dir import HFCheckpointReader
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict
    from megatron_vespo.checkpoint.mapping import Qwen3MoeDims

    hf = make_tiny_hf(tmp_path / "hf", num_hidden_layers=2)
    cfg = json.loads((hf / "config.json").read_text())
    dims = Qwen3MoeDims.from_hf_config(cfg)
    reader = HFCheckpointReader(hf)
    with conversion_model(str(hf), parallel_config(), torch.float32) as model:
        save_dir = tmp_path / "run"
        ckpt = Checkpointer(CheckpointConfig(load=str(hf), save_dir=str(save_dir), save_interval=2,
                                             hf_export_interval=4, keep_last=1), cfg, source_dir=str(hf))
        assert ckpt.resume(model) is None
        exported = export_hf_state_dict(model, dims)
        assert all(torch.equal(exported[k], reader.get(k)) for k in reader.keys())
        for it in range(1, 5):
            ckpt.maybe_save(it, model, state={"policy_version": it})
        assert sorted(p.name for p in save_dir.iterdir()) == ["hf", "iter_0000004", "latest_checkpointed_iteration.txt"]
        assert classify_checkpoint(save_dir) == "training" and classify_checkpoint(hf) == "hf"
        exported_bf16 = HFCheckpointReader(save_dir / "hf" / "iter_0000004")
        assert exported_bf16.get("lm_head.weight").dtype == torch.bfloat16
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        # no checkpoint.load: the save dir is resumed automatically
        state = Checkpointer(CheckpointConfig(save_dir=str(save_dir)), cfg).resume(model)
        assert state == {"iteration": 4, "policy_version": 4}
        exported = export_hf_state_dict(model, dims)
        assert all(torch.equal(exported[k], reader.get(k)) for k in reader.keys())
        with pytest.raises(ValueError, match="neither a training checkpoint"):
            classify_checkpoint(tmp_path)
