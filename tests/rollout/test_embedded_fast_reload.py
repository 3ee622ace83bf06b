"""Disk weight updates of the embedded engine copy safetensors straight into the served model."""

import pytest
import torch

from megatron_vespo.rollout.embedded import models
from megatron_vespo.rollout.embedded.models import load_hf_model, reload_weights_in_place, save_tiny_checkpoint


def test_reload_copies_files_in_place_without_building_a_model(tmp_path, monkeypatch):
    a = save_tiny_checkpoint(tmp_path / "a", seed=0)
    b = save_tiny_checkpoint(tmp_path / "b", seed=1)
    served = load_hf_model(a)
    ref = load_hf_model(b).state_dict()
    ptrs = {k: t.data_ptr() for k, t in served.state_dict().items()}

    def no_build(*args, **kwargs):
        raise AssertionError("reload built a model (from_pretrained) although the files cover it")
    monkeypatch.setattr(models, "load_hf_model", no_build)
    n = reload_weights_in_place(served, b)
    got = served.state_dict()
    assert n > 0 and set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
        assert got[k].data_ptr() == ptrs[k]  # in place: hooks and references stay valid


def test_reload_names_a_bad_shape_with_the_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    a = save_tiny_checkpoint(tmp_path / "a", seed=0)
    served = load_hf_model(a)
    f = sorted(a.glob("*.safetensors"))[0]
    tensors = load_file(str(f))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="shape mismatch"):
        reload_weights_in_place(served, a)
