"""``prepare_loop`` refuses an unusable ``loop.output_dir`` before building anything."""

import pytest

from megatron_vespo.config import ConfigError
from megatron_vespo.config.job import JobConfig
from megatron_vespo.orchestration.setup import prepare_loop


def test_output_dir_that_is_a_file_is_named(tmp_path, monkeypatch):
    import megatron_vespo.train.actor as actor

    def no_actor(*a, **k):
        raise AssertionError("actor built before the output_dir check")

    monkeypatch.setattr(actor, "MegatronActor", no_actor)
    (tmp_path / "afile").write_text("")
    job = JobConfig.model_validate({"loop": {"output_dir": str(tmp_path / "afile")}})
    with pytest.raises(ConfigError, match=r"loop.output_dir .*afile exists and is not a directory"):
        prepare_loop(job)


def test_interrupt_hidden_in_another_error_is_reraised():
    from megatron_vespo.orchestration.setup import raise_if_interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("Attempted to exit a cancel scope that isn't the current task's") from None
    except RuntimeError as exc:
        wrapped = exc  # `from None` hides the context from tracebacks, but it is still there (anyio's case)
    with pytest.raises(KeyboardInterrupt):
        raise_if_interrupted(wrapped)
    raise_if_interrupted(ValueError("a real rollout error"))  # returns: the loop reports it as a failure
