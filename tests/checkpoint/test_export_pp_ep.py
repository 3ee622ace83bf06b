"""Export under pipeline x expert parallelism (PP2 x EP2 on 4 gloo processes).

Regression: ``iter_hf_weights`` entered the EP all-gather of an expert unit only on ranks that
held the unit's *first* expert (EP rank 0) when PP > 1; the other EP ranks of the owning stage
skipped it and went on to the pipeline broadcast, so PP x EP exports (weight sync, HF saves)
deadlocked or mixed up tensors. Each unit now runs on every rank of the stage that owns the layer.
"""

import json

import pytest
import torch
from _dist import run_distributed
from tiny_hf import make_tiny_hf

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")


def _worker(rank, world, hf_dir):
    from megatron_vespo.checkpoint.convert import conversion_model, parallel_config
    from megatron_vespo.checkpoint.hf_dir import HFCheckpointReader
    from megatron_vespo.checkpoint.hf_weights import export_hf_state_dict, load_hf_weights
    from megatron_vespo.checkpoint.mapping import Qwen3MoeDims

    with conversion_model(hf_dir, parallel_config(pp=2, ep=2), torch.float32) as model:
        dims = Qwen3MoeDims.from_hf_config(json.loads(open(f"{hf_dir}/config.json").read()))
        load_hf_weights(model, HFCheckpointReader(hf_dir), dims)
        out = export_hf_state_dict(model, dims)
    return out if rank in (0, 3) else None


@pytest.mark.distributed
def test_pp2_ep2_export_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    hf = make_tiny_hf(tmp_path / "hf", mlp_only_layers=[0], num_hidden_layers=4)
    results = run_distributed(_worker, 4, str(hf), timeout=300)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    original = {}
    for shard in sorted(set(index["weight_map"].values())):
        original.update(load_file(str(hf / shard)))
    for r in (0, 3):
        assert results[r].keys() == original.keys()
        bad = [k for k in original if not torch.equal(results[r][k], original[k])]
        assert not bad, (r, bad[:5])
