"""Training checkpoints: atomic save + pointer + rotation, and exact resume of the Megatron actor."""

import pytest
import torch
from resume_cases import SAVE_AT, save_then_resume

from megatron_vespo.checkpoint import training
from megatron_vespo.checkpoint.training import (
    LATEST_NAME,
    latest_iteration,
    latest_iteration_dir,
    list_iterations,
    save_trainer_checkpoint,
)


def _fake_model_writer(fail: bool = False):
    def write(model, ckpt_dir, hf_cfg, **kwargs):
        (ckpt_dir / "model").mkdir()
        (ckpt_dir / "model" / "metadata.json").write_text("{}")
        if fail:
            raise OSError("disk full (simulated)")
    return write


def test_pointer_rotation_and_failed_save(tmp_path, monkeypatch):
    pytest.importorskip("megatron.core")
    assert latest_iteration(tmp_path) is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        latest_iteration_dir(tmp_path)
    monkeypatch.setattr(training, "write_model_checkpoint", _fake_model_writer())
    for it in (10, 20, 30):
        save_trainer_checkpoint(tmp_path, it, model=None, hf_cfg={}, state={"policy_version": it}, keep_last=2)
    assert list_iterations(tmp_path) == [20, 30] and latest_iteration(tmp_path) == 30
    assert latest_iteration_dir(tmp_path).name == "iter_0000030"
    assert torch.load(tmp_path / "iter_0000030" / "trainer_state.pt", weights_only=False)["state"] == \
        {"iteration": 30, "policy_version": 30}
    # a save that fails half-way leaves neither a directory nor a moved pointer
    monkeypatch.setattr(training, "write_model_checkpoint", _fake_model_writer(fail=True))
    with pytest.raises(OSError, match="disk full"):
        save_trainer_checkpoint(tmp_path, 40, model=None, hf_cfg={}, keep_last=2)
    assert list_iterations(tmp_path) == [20, 30] and latest_iteration(tmp_path) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LATEST_NAME, "iter_0000020", "iter_0000030"])
    with pytest.raises(ValueError, match="already exists"):
        save_trainer_checkpoint(tmp_path, 30, model=None, hf_cfg={})
    (tmp_path / LATEST_NAME).write_text("oops\n")
    with pytest.raises(ValueError, match="expected an iteration number"):
        latest_iteration(tmp_path)


def _check_exact(results, name):
    saved, resumed = results["saved"], results[name]
    assert resumed["state"]["iteration"] == SAVE_AT and resumed["state"]["policy_version"] == SAVE_AT
    # loss, grad norm and learning rate of every update after the resume: bit-identical
    assert resumed["steps"] == saved["steps"][SAVE_AT:], (resumed["steps"], saved["steps"][SAVE_AT:])
    assert torch.equal(resumed["rng_after_load"], saved["rng_after_save"])
    assert resumed["next_prompts"] == saved["next_prompts"]


def test_resume_is_exact_one_process(tmp_path):
    pytest.importorskip("megatron.core")
    try:
        results = save_then_resume(str(tmp_path / "ckpt"), {}, {"same": {}})
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    _check_exact(results, "same")
    # the training checkpoint is also a model checkpoint: it converts to HF
    from megatron_vespo.checkpoint.convert import mcore_to_hf

    report = mcore_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), verify=True)
    assert report["max_abs_logit_diff"] < 1e-5


def _ep2_worker(rank, world, save_dir):
    from resume_cases import make_actor

    from megatron_vespo.checkpoint.training import load_trainer_checkpoint
    from megatron_vespo.train.parallel import destroy_parallel

    ep2 = dict(expert_model_parallel_size=2)
    results = save_then_resume(save_dir, ep2, {"ep2": ep2})
    # TP2 has another chained-optimizer structure: a clear error (the model alone still loads)
    actor = make_actor(dict(tensor_model_parallel_size=2, sequence_parallel=True), seed=3)
    try:
        load_trainer_checkpoint(save_dir, model=actor.model, optimizer=actor.optimizer)
        results["tp2_error"] = None
    except ValueError as exc:
        results["tp2_error"] = str(exc)
    state = load_trainer_checkpoint(save_dir, model=actor.model, load_rng=False)
    results["tp2_model_only"] = state["iteration"]
    destroy_parallel()
    return results


@pytest.mark.distributed
def test_resume_is_exact_under_ep2_with_distributed_optimizer(tmp_path):
    pytest.importorskip("megatron.core")
    from _dist import run_distributed

    results = run_distributed(_ep2_worker, 2, str(tmp_path / "ckpt"), timeout=400)[0]
    _check_exact(results, "ep2")
    assert "Resume with the saved layout" in results["tp2_error"] and "'ep': 2" in results["tp2_error"]
    assert results["tp2_model_only"] == SAVE_AT
