"""Weight reloads of the embedded engine print no progress bar and leave transformers' setting as it was."""

import torch
import transformers.utils.logging as hf_logging

from megatron_vespo.rollout.embedded.models import load_hf_model, reload_weights_in_place, save_tiny_checkpoint


def test_reload_is_quiet_and_restores_the_progress_bar_setting(tmp_path, capfd):
    a = save_tiny_checkpoint(tmp_path / "a", preset="tiny", seed=0)
    b = save_tiny_checkpoint(tmp_path / "b", preset="tiny", seed=1)
    model = load_hf_model(a, "float32")
    capfd.readouterr()
    hf_logging.enable_progress_bar()
    assert reload_weights_in_place(model, b) > 0
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    ref = load_hf_model(b, "float32").state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in model.state_dict().items())
