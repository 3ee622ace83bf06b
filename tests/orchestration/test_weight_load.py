"""The async loop's deferred engine load (``loop.overlap_weight_load``), with fakes: no Ray, engines or Megatron.

``run_async`` runs for real against a fake setup, worker and engines that record what happens
in which order; the engines' load of version 1 waits (bounded) for the trainer to start
training batch 2, which the old loop -- the trainer waited for the load -- never did.
"""

import asyncio
import math
import threading
import time
from pathlib import Path

import pytest
import yaml
from _dist import run_distributed

from megatron_vespo.config.base import ConfigError
from megatron_vespo.config.job import JobConfig
from megatron_vespo.data import Prompt, PromptDataset
from megatron_vespo.orchestration import async_loop, rollout_worker, setup
from megatron_vespo.orchestration.async_buffer import policy_lag
from megatron_vespo.orchestration.rollout_worker import RolloutWorker
from megatron_vespo.orchestration.weight_load import BackgroundLoad, overlap_weight_load
from megatron_vespo.rollout.config import RolloutConfig
from megatron_vespo.types import Sample, SampleStatus
from megatron_vespo.utils.gc_control import GcPauses

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny_cpu_vespo.yaml"


def _job(tmp_path=None, **loop):
    raw = yaml.safe_load(TINY.read_text())
    kind = loop.pop("kind", "disk")
    raw["loop"] = {**raw.get("loop", {}), "mode": "async", **loop}
    if tmp_path is not None:
        raw["loop"]["output_dir"] = str(tmp_path / "run")
    raw["weight_sync"] = {**raw.get("weight_sync", {}), "kind": kind}
    return JobConfig.model_validate(raw)


# ---------------------------------------------------------------- config
def test_the_option_is_on_where_it_applies_and_refused_by_name_elsewhere():
    assert overlap_weight_load(_job(max_policy_lag=1)) is True
    assert overlap_weight_load(_job(max_policy_lag=0)) is False  # falls back to the synchronous load
    assert overlap_weight_load(_job(max_policy_lag=1, kind="tensor")) is True  # CPU: staged in shared memory
    assert overlap_weight_load(_job(max_policy_lag=2, overlap_weight_load=False)) is False
    with pytest.raises(ConfigError, match=r"loop\.overlap_weight_load=true.*loop\.max_policy_lag=0"):
        overlap_weight_load(_job(max_policy_lag=0, overlap_weight_load=True))
    with pytest.raises(ConfigError, match=r"loop\.overlap_weight_load=true.*weight_sync\.kind=distributed"):
        overlap_weight_load(_job(max_policy_lag=1, overlap_weight_load=True, kind="distributed"))


def test_the_tensor_path_is_not_deferred_on_gpu(monkeypatch):
    """On GPU the staged buckets would be a second copy of the model in device memory."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert overlap_weight_load(_job(max_policy_lag=1, kind="tensor")) is False
    assert overlap_weight_load(_job(max_policy_lag=1, kind="disk")) is True
    with pytest.raises(ConfigError, match=r"weight_sync\.kind=tensor on GPU"):
        overlap_weight_load(_job(max_policy_lag=1, overlap_weight_load=True, kind="tensor"))


# ---------------------------------------------------------------- BackgroundLoad
def test_background_load_join_waits_returns_metrics_and_refuses_a_second_job():
    loader, gate = BackgroundLoad(rank0=True), threading.Event()
    loader.start(lambda: (gate.wait(5), {"weight_sync/load_s": 0.5})[1], "load 1")
    with pytest.raises(RuntimeError, match="join it first"):
        loader.start(lambda: {}, "load 2")  # the engines' event loop is not thread-safe
    threading.Timer(0.05, gate.set).start()
    m = loader.join()
    assert m["weight_sync/load_s"] == 0.5 and m["time/weight_load_wait_s"] > 0
    assert not loader.pending and loader.join() == {"time/weight_load_wait_s": 0.0}  # idle join: no wait


def test_background_error_is_raised_at_the_join_and_the_loader_stays_usable():
    loader = BackgroundLoad(rank0=True)
    loader.start(lambda: 1 / 0, "engine load of version 3")
    with pytest.raises(RuntimeError, match="engine load of version 3: ZeroDivisionError") as info:
        loader.join()
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    loader.start(lambda: {"x": 1.0}, "engine load of version 4")
    assert loader.join()["x"] == 1.0


def _join_on_two_ranks(rank, world_size):
    loader = BackgroundLoad(rank0=rank == 0)
    if rank == 0:
        loader.start(lambda: (_ for _ in ()).throw(OSError("engine gone")), "engine load of version 2")
    try:
        loader.join()
    except RuntimeError as exc:
        return str(exc)
    return None


def test_background_error_is_raised_on_every_rank():
    msgs = run_distributed(_join_on_two_ranks, 2, timeout=120)
    assert all(m is not None and "engine load of version 2: OSError: engine gone" in m for m in msgs), msgs


# ---------------------------------------------------------------- the loop, with fakes
class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Ref:
    """A Ray object reference whose ``ray.get`` is logged."""

    def __init__(self, value, log, name):
        self.value, self.log, self.name = value, log, name


class FakeWorker:
    """The trainer-facing calls of the Ray worker; ``ray.get`` is the identity below (a ``_Ref``: logged)."""

    def __init__(self, log):
        self.log = log
        self.snapshot = _Remote(self._snapshot)
        self.set_version = _Remote(lambda v: self.log.append(("set_version", v)))
        self.stop = _Remote(lambda: self.log.append(("worker stop",)))

    def _snapshot(self, trained=None):
        self.log.append(("snapshot asked",))
        return _Ref({"stats": {"clock_s": 1.0, "samples": 0, "engine_busy_s": []},
                     "state": {"epoch": 0, "offset": 0, "pending_prompts": []}}, self.log, "snapshot")


class FakeRay:
    def is_initialized(self):
        return True

    def get(self, x, timeout=None):
        if isinstance(x, _Ref):
            x.log.append((f"{x.name} read",))
            return x.value
        return x

    def kill(self, handle):
        pass


class FakeRouter:
    def __init__(self, engines):
        self.engines, self.urls, self.clients = engines, ["http://fake"], [type("C", (), {"route_spec": None})()]

    async def pause_generation(self, mode):
        self.engines.log.append(("pause",))

    async def update_weights_from_disk(self, path, version, **kw):
        await asyncio.sleep(0)
        self.engines.load(path, version)

    async def continue_generation(self):
        self.engines.log.append(("continue",))


class FakeEngines:
    """Records loads; ``run`` refuses concurrent use, as an asyncio loop used from two threads would break."""

    def __init__(self, log, trained, fail_at=None, hold=5.0, hold_for=(1,)):
        self.log, self.trained, self.fail_at, self.hold, self.hold_for = log, trained, fail_at, hold, hold_for
        self.router, self.served, self._busy = FakeRouter(self), 0, threading.Lock()

    def run(self, aw):
        if not self._busy.acquire(blocking=False):
            raise AssertionError("the engines' event loop was used from two threads at once")
        try:
            return asyncio.run(aw)
        finally:
            self._busy.release()

    def load(self, path, version):
        assert Path(path).is_dir(), f"{path} was rotated away before the engines loaded it"
        if version == self.fail_at:
            raise OSError(f"engine could not read {path}")
        # the load of a version in hold_for waits (at most `hold` s) until the trainer trains batch v + 1,
        # then takes a little longer: the trainer, if it does not wait for the load, gets ahead of it
        overlapped = False
        if version in self.hold_for:
            overlapped = self.trained[version + 1].wait(self.hold)
            time.sleep(0.1)
        self.log.append(("loaded", version, overlapped))
        self.served = version

    def stop(self):
        self.log.append(("engines stop",))


class FakeDisk:
    def __init__(self, root, keep_last=1):
        self.root, self.keep_last = Path(root), keep_last

    def export(self, model, version):
        out = self.root / f"v{version:06d}"
        out.mkdir(parents=True)
        return out

    def rotate(self, current):
        for p in self.root.glob("v*"):
            if int(p.name[1:]) <= current - self.keep_last:
                p.rmdir()


class FakeSetup:
    def __init__(self, job, tmp_path, log, engines, interrupt_at=None, eval_at=(), guard=False, stage_s=0.0,
                 saves_at=None):
        self.job, self.log, self.engines, self.interrupt_at = job, log, engines, interrupt_at
        self.saves_at = saves_at
        self.stage_fails_at = None  # the staging of this version raises (a full /dev/shm, say)
        self.stage_delay = stage_s  # seconds a staging takes (the guarded case: it runs in the background)
        self.rank0, self.version, self.start, self.state, self.data_state = True, 0, 0, None, {}
        self.dataset = None
        self.gc_pauses = GcPauses().install()  # the loop reads time/gc_s from it and removes it at the end
        self.sync = type("Sync", (), {"disk": FakeDisk(tmp_path / "weights"), "close": lambda self, e: None})()
        self.sync.update = self._sync_update  # the synchronous path (update_engines)
        self.sync.stage, self.sync.send = self._stage, self._send  # weight_sync.kind=tensor
        outer = self

        class Actor:
            model = None

            def train_on_rollout(self, batch):
                it = batch
                outer.log.append(("train", it))
                engines.trained.setdefault(it, threading.Event()).set()
                if it == outer.interrupt_at:
                    raise KeyboardInterrupt
                for hook in outer.step_hooks:  # the optimizer's pre-step hooks, before any parameter write
                    hook()
                outer.log.append(("step", it))
                return [{"loss": 0.0}]

        class Evaluator:
            def due(self, it):
                return it in eval_at

            def maybe_evaluate(self, it, eng, model):
                if self.due(it):
                    outer.log.append(("eval", it, eng.served))
                return {}

        self.step_hooks = []
        if guard:  # an actor that can guard its parameter writes (MegatronActor.before_param_update)
            def before_param_update(actor, fn):
                self.step_hooks.append(fn)
                return lambda: (self.step_hooks.remove(fn), self.log.append(("unhooked",)))
            Actor.before_param_update = before_param_update
        self.actor, self.evaluator = Actor(), Evaluator()

    def after_first_iteration(self, it, engines, worker=None):  # loop.freeze_gc: recorded, never run here
        self.log.append(("after_first_iteration", it))

    def _sync_update(self, model, version, view):
        path = self.sync.disk.export(model, version)
        view.run(view.update_weights_from_disk(str(path), version))
        self.sync.disk.rotate(version)
        return {"weight_sync/export_s": 0.0, "weight_sync/load_s": 0.0}

    def _stage(self, model, engines):  # tensor path: the staged buckets stand in as a directory
        time.sleep(self.stage_delay)
        n = len([e for e in self.log if e[0] == "staged"]) + 1
        if n == self.stage_fails_at:
            self.log.append(("staging failed", n))
            raise OSError("shared memory full")
        self.log.append(("staged", len([e for e in self.log if e[0] == "staged"]) + 1))
        self.log.append(("staged in", threading.current_thread() is threading.main_thread()))
        return type("Staged", (), {"stage_s": 0.0, "path": self.sync.disk.export(model, len(self.log))})()

    def _send(self, staged, version, engines, pause_mode=None):
        engines.run(engines.router.update_weights_from_disk(str(staged.path), version))
        return {"weight_sync/load_s": 0.0, "time/engines_paused_s": 0.0}

    def start_engines(self, embedded_mode=None):
        return self.engines

    def metrics_logger(self):
        return type("M", (), {"close": lambda self: None})()

    def log_iteration(self, mlog, it, version, updates, metrics, train_s, iteration_s):
        self.log.append(("row", it, dict(metrics)))
        return {"rollout/reward_mean": 0.0, "async/lag_mean": 0.0, "async/lag_max": 0, "time/wait_s": 0.0,
                "async/overlap_frac": 0.0, **metrics}

    def saves_state(self, it):  # LoopSetup.saves_state: a training checkpoint (with the data position) is due
        return it in self.saves_at if self.saves_at is not None else it == self.job.loop.num_rollouts

    def save(self, it, version, data_state, router_state=None):
        self.log.append(("save", it, version))
        self.log.append(("state", it, data_state))


def _run(monkeypatch, tmp_path, *, lag=1, rollouts=3, fail_at=None, interrupt_at=None, hold=5.0, hold_for=(1,),
         eval_at=(), guard=False, stage_s=0.0, saves_at=None, **loop):
    job = _job(tmp_path, max_policy_lag=lag, num_rollouts=rollouts, **loop)
    log, trained = [], {}
    engines = FakeEngines(log, trained, fail_at=fail_at, hold=hold, hold_for=hold_for)
    for v in range(1, rollouts + 2):
        trained[v] = threading.Event()
    fake = FakeSetup(job, tmp_path, log, engines, interrupt_at=interrupt_at, eval_at=eval_at, guard=guard,
                     stage_s=stage_s, saves_at=saves_at)

    def pull(ray, worker, n, version, ahead=None, ask_ahead=False):
        return version + 1, None, ({"time/wait_s": 0.0}, {"clock_s": 0.0, "samples": 0, "engine_busy_s": []}, None,
                                   None)

    def broadcast(rank0, fn, what, actor=None, error=None):
        if error is not None:
            raise RuntimeError(error)
        out, err = setup.run_on_rank0(rank0, fn, what)
        if err is not None:
            raise RuntimeError(err)
        return out

    monkeypatch.setattr(async_loop, "require", lambda *a: FakeRay())
    monkeypatch.setattr(async_loop, "_pull", pull)
    monkeypatch.setattr(setup, "prepare_loop", lambda j: fake)
    monkeypatch.setattr(setup, "rank0_then_broadcast", broadcast)
    monkeypatch.setattr(rollout_worker, "spawn_worker", lambda *a, **k: FakeWorker(log))
    return log, lambda: async_loop.run_async(job)


def test_the_trainer_trains_the_next_batch_while_the_engines_load(monkeypatch, tmp_path):
    log, run = _run(monkeypatch, tmp_path, rollouts=3, eval_at=(2,))
    run()
    loads = [e for e in log if e[0] == "loaded"]
    # version 1's load overlapped training batch 2 (the old loop waited for the load before pulling it)
    assert loads[0] == ("loaded", 1, True), log
    assert [v for _, v, _ in loads] == [1, 2, 3]  # the last load is joined before the run ends
    # the worker learns a version only after the engines serve it
    for v in (1, 2, 3):
        assert log.index(("loaded", v, loads[v - 1][2])) < log.index(("set_version", v))
    # join before the held-out evaluation: at rollout 2 the engines already serve version 2
    assert ("eval", 2, 2) in log
    # and before shutdown: the engines stop only after the last load
    assert log.index(("engines stop",)) > log.index(loads[-1])
    rows = [e[2] for e in log if e[0] == "row"]
    assert all("time/weight_load_wait_s" in r and "weight_sync/export_s" in r for r in rows)
    assert [e for e in log if e[0] == "save"] == [("save", 1, 1), ("save", 2, 2), ("save", 3, 3)]
    # loop.freeze_gc is offered every iteration (the setup acts only on the first), after the previous
    # load is joined and before this version's load starts: no background job holds the engines' loop
    firsts = [e for e in log if e[0] == "after_first_iteration"]
    assert firsts == [("after_first_iteration", it) for it in (1, 2, 3)], log
    assert log.index(firsts[0]) < log.index(loads[0]) < log.index(firsts[1]) < log.index(loads[1])


def test_the_tensor_path_stages_on_the_trainers_path_and_loads_in_the_background(monkeypatch, tmp_path):
    log, run = _run(monkeypatch, tmp_path, rollouts=3, kind="tensor")
    run()
    loads = [e for e in log if e[0] == "loaded"]
    assert loads[0] == ("loaded", 1, True), log  # version 1's transfer overlapped training batch 2
    assert [v for _, v, _ in loads] == [1, 2, 3]
    for v in (1, 2):  # staged before the next batch is trained
        assert log.index(("staged", v)) < log.index(("train", v + 1))
    for v in (1, 2, 3):  # the worker hears of v only after the engines serve it
        assert log.index(("loaded", v, loads[v - 1][2])) < log.index(("set_version", v))
    # a staging is never started while the previous transfer may still read the buffers
    for v in (2, 3):
        assert log.index(("loaded", v - 1, loads[v - 2][2])) < log.index(("staged", v))
    # the worker's snapshot is asked for right after training. Only the last rollout saves a checkpoint
    # (it needs the data position): its snapshot is read in the same iteration, after the staging. The
    # others are read in the next iteration, after its training: their round trip is off the trainer's path
    asked = [i for i, e in enumerate(log) if e == ("snapshot asked",)]
    read = [i for i, e in enumerate(log) if e == ("snapshot read",)]
    staged = [log.index(("staged", v)) for v in (1, 2, 3)]
    trained = [log.index(("train", v)) for v in (1, 2, 3)]
    assert len(asked) == len(read) == 3
    for k in range(3):
        assert trained[k] < asked[k] < staged[k] < read[k], log
    for k in range(2):
        assert staged[k + 1] < read[k], log
    assert read[2] < log.index(("save", 3, 3))
    rows = [e[2] for e in log if e[0] == "row"]
    assert math.isnan(rows[0]["async/overlap_frac"])  # no earlier training to report
    assert all("async/overlap_frac" in r for r in rows[1:])  # each row: the rollout before it


def test_a_due_checkpoint_reads_the_snapshot_in_its_own_iteration(monkeypatch, tmp_path):
    """The data position a checkpoint saves comes from the snapshot after that rollout's training."""
    log, run = _run(monkeypatch, tmp_path, rollouts=3, kind="tensor", saves_at=(2, 3))
    run()
    read = [i for i, e in enumerate(log) if e == ("snapshot read",)]
    saves = {it: log.index(("save", it, it)) for it in (1, 2, 3)}
    # rollout 1 saves nothing: its snapshot is read in rollout 2, which then reads its own before saving;
    # rollout 3 reads rollout 2's again (for the overlap metrics of its row) and its own
    assert len(read) == 4
    assert saves[1] < read[0] < read[1] < saves[2] < read[2] < read[3] < saves[3], log
    states = {e[1]: e[2] for e in log if e[0] == "state"}
    assert states[1] is None and states[2] is not None and states[3] is not None


def test_one_process_stages_in_the_background_and_the_next_optimizer_step_waits_for_it(monkeypatch, tmp_path):
    """An actor that guards its parameter writes gets the staging moved into the background job.

    The staging (slowed to 0.3 s here) then overlaps the pull and the next forward-backward; the
    next optimizer step, and only it, waits until the staging has read the weights.
    """
    log, run = _run(monkeypatch, tmp_path, rollouts=3, kind="tensor", guard=True, stage_s=0.3, hold_for=())
    run()
    assert [e for e in log if e[0] == "staged in"] == [("staged in", False)] * 3  # never on the main thread
    for v in (1, 2):
        # the next batch started training while version v was still being staged, and its optimizer
        # step came only after the staging
        assert log.index(("train", v + 1)) < log.index(("staged", v)) < log.index(("step", v + 1)), log
    loads = [e for e in log if e[0] == "loaded"]
    for v in (1, 2, 3):  # staged, then sent, then the worker hears of the version
        assert log.index(("staged", v)) < log.index(loads[v - 1]) < log.index(("set_version", v))
    rows = [e[2] for e in log if e[0] == "row"]
    assert all(r["weight_sync/export_s"] == 0.0 for r in rows)  # nothing left on the trainer's path
    assert rows[0]["time/params_wait_s"] == 0.0  # nothing staged before the first step
    assert all(r["time/params_wait_s"] > 0.1 for r in rows[1:])  # the steps of batches 2, 3 waited
    assert all(r["weight_sync/total_s"] >= r["time/params_wait_s"] for r in rows)
    assert log.index(("step", 3)) < log.index(("unhooked",))  # the hook is removed when the loop ends


def test_a_failed_background_staging_releases_the_optimizer_and_fails_the_run_at_the_join(monkeypatch, tmp_path):
    """The staging raising in the background must neither hang the next optimizer step (the gate is
    released) nor be lost: the run fails at the next join, on every rank, and shuts down."""
    log, run = _run(monkeypatch, tmp_path, rollouts=4, kind="tensor", guard=True, stage_s=0.2, hold_for=())
    fake = setup.prepare_loop(None)  # the FakeSetup _run installed
    fake.stage_fails_at = 2
    with pytest.raises(RuntimeError, match="staging and engine load of version 2: OSError: shared memory full"):
        run()
    # batch 3 trained and its optimizer step ran (not blocked by the failed staging); the error came at
    # rollout 3's join, before its staging, version 2 never reached the engines or the worker
    assert log.index(("staging failed", 2)) < log.index(("step", 3)), log
    assert ("save", 3, 3) not in log and ("set_version", 2) not in log
    assert ("unhooked",) in log and log[-2:] == [("worker stop",), ("engines stop",)]


def test_lag_zero_falls_back_to_the_synchronous_load(monkeypatch, tmp_path):
    log, run = _run(monkeypatch, tmp_path, lag=0, rollouts=2, hold=0.05)
    run()
    assert [e for e in log if e[0] == "loaded"][0] == ("loaded", 1, False)  # done before batch 2 was pulled
    assert log.index(("set_version", 1)) < log.index(("train", 2))


def test_overlap_off_keeps_the_synchronous_load(monkeypatch, tmp_path):
    log, run = _run(monkeypatch, tmp_path, rollouts=2, hold=0.05, overlap_weight_load=False)
    run()
    assert [e for e in log if e[0] == "loaded"][0] == ("loaded", 1, False)


def test_a_failed_background_load_fails_the_run_at_the_next_join_and_shuts_down(monkeypatch, tmp_path):
    log, run = _run(monkeypatch, tmp_path, rollouts=4, fail_at=2)
    with pytest.raises(RuntimeError, match="engine load of version 2: OSError: engine could not read"):
        run()
    assert ("save", 2, 2) in log and ("save", 3, 3) not in log  # raised at rollout 3's join, before its update
    assert ("set_version", 2) not in log  # the worker never counts a version the engines do not serve
    assert log[-2:] == [("worker stop",), ("engines stop",)]


def test_ctrl_c_joins_the_pending_load_before_stopping_the_engines(monkeypatch, tmp_path):
    log, run = _run(monkeypatch, tmp_path, rollouts=4, interrupt_at=3, hold_for=(2,))
    with pytest.raises(KeyboardInterrupt):
        run()
    # load 2 was in flight while batch 3 trained (and was interrupted): it finished before the engines stopped
    assert ("loaded", 2, True) in log and log.index(("engines stop",)) > log.index(("loaded", 2, True))


# ---------------------------------------------------------------- lag accounting with a late set_version
class _Router:
    """Engine stand-in: a sample carries the version the engine serves at its first token."""

    def __init__(self):
        self.clients, self.version = [], 0

    async def generate_groups(self, prompts, sampling, n, *, first_group=0, metadata=None, batched=True):
        out = []
        for g, p in enumerate(prompts):
            v = self.version
            await asyncio.sleep(0.001)
            out += [Sample(list(p), [1, 6], policy_version=v, group_index=first_group + g,
                           status=SampleStatus.COMPLETED, metadata=dict(metadata[g])) for _ in range(n)]
        return out


@pytest.mark.parametrize("lag", [1, 2])
def test_deferred_version_publication_keeps_every_lag_within_the_bound_and_never_starves(lag):
    """The trainer takes batch v+1 before the engines load v and before the worker hears of v."""

    async def go():
        router, b = _Router(), 3
        ds = PromptDataset([Prompt(tokens=[7, i], label=1, index=i) for i in range(300)], seed=0)
        w = RolloutWorker(RolloutConfig(n_samples_per_prompt=2), ["http://fake"], ds, "token_class",
                          groups_per_batch=b, max_policy_lag=lag, start_version=0, buffer_groups=(lag + 1) * b,
                          max_inflight_groups=b, router=router)
        await w.start()
        version, lags, pending = 0, [], None
        for _ in range(20):
            res = await w.take(b, current_version=version, timeout_s=5)
            assert len(res["groups"]) == b, "the trainer starved: the next batch needed the new budget"
            assert "stats" in res  # the overlap interval starts with the take's own snapshot
            lags += [policy_lag(g, version) for g in res["groups"]]
            if pending is not None:  # the previous version's load finishes while this batch trains
                router.version = pending
                await w.set_version(pending)
            await asyncio.sleep(0.002)  # training
            version += 1
            pending = version  # exported; the load runs in the background
        snap = await w.snapshot()
        assert set(snap) == {"stats", "state"} and "pending_prompts" in snap["state"]
        await w.stop()
        return lags

    lags = asyncio.run(go())
    assert max(lags) <= lag and max(lags) >= 1
