"""The CPU thread policy: async mode splits the cores between the trainer and the engine processes."""

from types import SimpleNamespace

import pytest

from megatron_vespo.orchestration import threads
from megatron_vespo.rollout.config import RolloutConfig
from megatron_vespo.train.config import TrainConfig


def _job(mode="async", torch_threads=None, engine_threads=None, num_engines=1, engine="embedded"):
    return SimpleNamespace(train=TrainConfig(torch_threads=torch_threads),
                           rollout=RolloutConfig(engine_threads=engine_threads, num_engines=num_engines, engine=engine),
                           loop=SimpleNamespace(mode=mode))


@pytest.fixture
def cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_cores(n):
        monkeypatch.setattr(threads, "available_cpus", lambda: n)
    return set_cores


def test_async_splits_the_cores_between_trainer_and_engine(cores):
    cores(2)
    job = _job()
    assert threads.trainer_threads(job) == 1
    assert threads.engine_threads(job.rollout, overlapped=True) == 1
    cores(8)
    assert threads.trainer_threads(job) == 4
    assert threads.trainer_threads(_job(num_engines=3)) == 2
    assert threads.engine_threads(_job(num_engines=3).rollout, overlapped=True) == 2


def test_sync_trainer_keeps_torch_default_and_engines_share(cores):
    cores(8)
    assert threads.trainer_threads(_job(mode="sync")) is None
    assert threads.engine_threads(_job(mode="sync", num_engines=4).rollout, overlapped=False) == 2


def test_explicit_fields_and_omp_num_threads_win(cores, monkeypatch):
    cores(2)
    assert threads.trainer_threads(_job(torch_threads=2)) == 2
    assert threads.engine_threads(_job(engine_threads=3).rollout, overlapped=True) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.trainer_threads(_job()) is None
    assert threads.engine_threads(_job().rollout, overlapped=True) is None
    assert threads.trainer_threads(_job(torch_threads=1)) == 1


def test_at_least_one_thread_and_torchrun_ranks_count(cores, monkeypatch):
    cores(2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.trainer_threads(_job()) == 1
    assert threads.engine_threads(_job().rollout, overlapped=True) == 1
    cores(10)
    assert threads.trainer_threads(_job()) == 2  # 10 cores / (4 trainers + 1 engine)


def test_engine_processes_get_the_thread_count(cores, monkeypatch):
    """RolloutEngines passes OMP_NUM_THREADS to the embedded server processes it starts."""
    from megatron_vespo.orchestration import engines as eng
    from megatron_vespo.rollout.embedded import server

    cores(2)
    seen = []
    monkeypatch.setattr(server, "start_embedded_server",
                        lambda *a, **kw: seen.append(kw) or SimpleNamespace(url="http://127.0.0.1:1"))
    e = eng.RolloutEngines(RolloutConfig(num_engines=1), "unused", embedded_mode="process")
    try:
        e._start_engines()
    finally:
        e.loop.close()
    assert seen[0]["mode"] == "process" and seen[0]["env"] == {"OMP_NUM_THREADS": "1"}


def test_fields_reject_zero():
    with pytest.raises(Exception, match="torch_threads"):
        TrainConfig(torch_threads=0)
    with pytest.raises(Exception, match="engine_threads"):
        RolloutConfig(engine_threads=0)
