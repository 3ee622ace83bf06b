"""Shared pytest setup: GPU-marked tests skip with the reason on CPU machines."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")


def pytest_sessionstart(session):
    """Fail the run when megatron-core or transformers is installed but does not import.

    ~60 tests guard themselves with ``pytest.importorskip("megatron.core")``; a broken install
    (wrong torch, missing dependency) would otherwise turn them all into silent skips.
    Packages that are genuinely absent still skip.
    """
    from megatron_vespo.utils.versions import broken_installs

    broken = broken_installs()
    if broken:
        raise pytest.UsageError("installed but not importable (fix the environment; tests would silently skip): "
                                + "; ".join(f"{k}: {v}" for k, v in broken.items()))


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests when no CUDA device is present, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (Transformer Engine / NCCL / SGLang); this machine is CPU-only")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _destroy_parallel() -> None:
    from megatron_vespo.parallel.state import destroy_parallel

    destroy_parallel(destroy_process_group=True)


@pytest.fixture
def parallel_teardown():
    """Megatron's parallel state and the 1-process group a test built are torn down after it.

    For tests that build an actor or model in this process (``init_parallel`` creates a group on
    first use); one group per test, so the next test can pick another layout.
    """
    pytest.importorskip("megatron.core")
    yield
    _destroy_parallel()


@pytest.fixture(scope="module")
def parallel_teardown_module():
    """As ``parallel_teardown``, once after the whole module (its tests share one layout).

    Use it with ``pytestmark = [..., pytest.mark.usefixtures("parallel_teardown_module")]``, or
    request it from a module fixture that builds the model. The environment is restored too
    (a launcher-style init may set ``RANK`` / ``MASTER_PORT``, which later subprocesses would inherit).
    """
    pytest.importorskip("megatron.core")
    env = dict(os.environ)
    yield
    _destroy_parallel()
    os.environ.clear()
    os.environ.update(env)
