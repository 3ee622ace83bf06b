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


def _wrapped_interrupt() -> RuntimeError:
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("cancel scope") from None
    except RuntimeError as exc:
        return exc


def test_run_on_rank0_returns_the_error_and_keeps_ctrl_c(caplog):
    from megatron_vespo.orchestration.setup import run_on_rank0

    calls = []
    assert run_on_rank0(False, lambda: calls.append(1), "rollout 3") == (None, None) and not calls  # rank 0 only
    assert run_on_rank0(True, lambda: 7, "rollout 3") == (7, None)

    def fail():
        raise ValueError("engine gone")

    assert run_on_rank0(True, fail, "rollout 3") == (None, "rollout 3: ValueError: engine gone")
    assert "rollout 3 failed" in caplog.text  # logged with its traceback on rank 0

    def interrupted():
        raise _wrapped_interrupt()

    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C wrapped by a library is not a "rollout failure"
        run_on_rank0(True, interrupted, "rollout 3")


def test_rank0_then_broadcast_raises_rank0_error_everywhere():
    import torch.distributed as dist

    from megatron_vespo.orchestration.setup import rank0_then_broadcast

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert rank0_then_broadcast(True, lambda: (None, {"pos": 3}, "local"), "rollout 1") == (None, {"pos": 3},
                                                                                                 "local")

        def fail():
            raise OSError("disk")

        with pytest.raises(RuntimeError, match="rollout failed on rank 0: rollout 2: OSError: disk"):
            rank0_then_broadcast(True, fail, "rollout 2")
        called = []
        with pytest.raises(RuntimeError, match="earlier failure"):  # an earlier error skips fn, is broadcast
            rank0_then_broadcast(True, lambda: called.append(1), "x", error="earlier failure")
        assert not called
    finally:
        if created:
            dist.destroy_process_group()
