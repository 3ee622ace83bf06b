"""Fault injection on checkpoints, without a training run: each case is an attack from issue 9.

A killed save (untrusted iteration directory, ``.partial`` / ``.tmp`` leftovers), a full disk,
a malicious pickle, damaged safetensors handed to ``convert``, file modes of outputs, the
single-process store. The model writer is replaced by a stub where the model does not matter
(``_stub_writer``); everything else is the real code.
"""

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_vespo.checkpoint import safety, training
from megatron_vespo.checkpoint.config import CheckpointConfig
from megatron_vespo.checkpoint.training import LATEST_NAME, latest_iteration, list_iterations

pytest.importorskip("megatron.core")


def _stub_writer(payload: int = 0):
    """Stands in for ``write_model_checkpoint``: a model/ dir, optionally ``payload`` bytes of "weights"."""
    def write(model, ckpt_dir, hf_cfg, **kwargs):
        (ckpt_dir / "model").mkdir()
        (ckpt_dir / "model" / "metadata.json").write_text("{}")
        if payload:
            with open(ckpt_dir / "model" / "weights.bin", "wb") as fh:
                fh.write(os.urandom(payload))
    return write


def _checkpointer(save_dir, **kw):
    from megatron_vespo.checkpoint.checkpointer import Checkpointer

    return Checkpointer(CheckpointConfig(save_dir=str(save_dir), save_interval=1, **kw), {})


def _saved_state(ckpt_dir: Path) -> dict:
    return safety.safe_torch_load(ckpt_dir / "trainer_state.pt")["state"]


# ----------------------------------------------------------------------------- killed between rename and pointer
def test_iteration_newer_than_the_pointer_is_replaced_and_rotation_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "write_model_checkpoint", _stub_writer())
    save = tmp_path / "ckpt"
    ckpt = _checkpointer(save, keep_last=2)
    for it in (1, 2):
        ckpt.maybe_save(it, None, state={"policy_version": it})
    # the killed run: iter_0000003 renamed into place, pointer still at 2 (its state is another trajectory's)
    training.save_trainer_checkpoint(save, 3, model=None, hf_cfg={}, state={"policy_version": 999}, keep_last=9)
    (save / LATEST_NAME).write_text("2\n")
    assert list_iterations(save) == [1, 2, 3] and latest_iteration(save) == 2
    # the resumed run's last iteration: the final checkpoint is written, not "already exists"
    written = ckpt.maybe_save(3, None, state={"policy_version": 3}, force=True)
    assert [p.name for p in written] == ["iter_0000003"]
    assert latest_iteration(save) == 3
    assert _saved_state(save / "iter_0000003")["policy_version"] == 3
    assert list_iterations(save) == [2, 3]  # keep_last = 2
    # an iteration the pointer confirms is kept as is
    assert ckpt.maybe_save(3, None, state={"policy_version": 4}, force=True) == []
    assert _saved_state(save / "iter_0000003")["policy_version"] == 3


def test_a_failed_hf_export_leaves_the_pointer_on_the_previous_iteration(tmp_path, monkeypatch):
    """The HF export is written before the training checkpoint, so the resumed run redoes both."""
    from megatron_vespo.checkpoint import hf_dir

    monkeypatch.setattr(training, "write_model_checkpoint", _stub_writer())
    save = tmp_path / "ckpt"
    ckpt = _checkpointer(save, keep_last=2, hf_export_interval=2)
    ckpt.maybe_save(1, None, state={})

    def killed(*args, **kwargs):
        raise RuntimeError("killed during the HF export (simulated)")

    monkeypatch.setattr(hf_dir, "save_hf_checkpoint", killed)
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.maybe_save(2, None, state={})
    assert latest_iteration(save) == 1 and list_iterations(save) == [1]


def test_leftovers_and_unconfirmed_iterations_are_removed_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "write_model_checkpoint", _stub_writer())
    save = tmp_path / "ckpt"
    ckpt = _checkpointer(save, keep_last=3)
    for it in (1, 2):
        ckpt.maybe_save(it, None, state={"policy_version": it})
    partial = save / ".iter_0000003.abcd.partial"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "shard.distcp").write_bytes(b"x" * 1000)
    (save / f".{LATEST_NAME}.k2j3.tmp").write_text("3\n")
    training.save_trainer_checkpoint(save, 4, model=None, hf_cfg={}, keep_last=9)
    (save / LATEST_NAME).write_text("2\n")
    (save / "hf" / "iter_0000004").mkdir(parents=True)
    (save / "hf" / ".iter_0000005.x.partial").mkdir()
    keep_files = sorted(p.name for p in save.iterdir())
    assert ".iter_0000003.abcd.partial" in keep_files
    _checkpointer(save).clean()  # the first step of Checkpointer.resume
    assert sorted(p.name for p in save.iterdir()) == ["hf", "iter_0000001", "iter_0000002", LATEST_NAME]
    assert list((save / "hf").iterdir()) == []
    assert latest_iteration(save) == 2


def test_clean_never_removes_the_directory_being_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "write_model_checkpoint", _stub_writer())
    save = tmp_path / "ckpt"
    for it in (1, 2):
        training.save_trainer_checkpoint(save, it, model=None, hf_cfg={}, keep_last=9)
    (save / LATEST_NAME).write_text("1\n")
    removed = training.clean_save_dir(save, keep=save / "iter_0000002")
    assert removed == [] and list_iterations(save) == [1, 2]


# ----------------------------------------------------------------------------- full disk
def _tiny_tmpfs(path: Path, size: str):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.decode().strip()}")


def test_full_disk_during_save_says_so_and_where(tmp_path, monkeypatch):
    """A real full filesystem (a 512 KiB tmpfs): torch.save's short write ('unexpected pos ...') is named."""
    disk = tmp_path / "disk"
    _tiny_tmpfs(disk, "512k")
    try:
        save = disk / "ckpt"
        monkeypatch.setattr(training, "write_model_checkpoint", _stub_writer())
        training.save_trainer_checkpoint(save, 1, model=None, hf_cfg={}, keep_last=2)
        # the next save's "weights" leave ~2 KB: the RNG file (torch.save, ~6 KB) hits ENOSPC
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        monkeypatch.setattr(training, "write_model_checkpoint", _stub_writer(payload=free - 2048 - 3 * 4096))
        with pytest.raises(safety.DiskFullError) as info:
            training.save_trainer_checkpoint(save, 2, model=None, hf_cfg={}, keep_last=2)
        msg = str(info.value)
        assert "disk full" in msg and str(save) in msg and "iteration 1" in msg, msg
        assert info.value.errno == errno.ENOSPC
        # nothing half-written survives, the pointer still names the complete checkpoint
        assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", LATEST_NAME]
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # busy: detach it anyway


def test_enospc_errno_anywhere_in_the_chain_is_a_full_disk(tmp_path):
    inner = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise inner
        except OSError as exc:
            raise RuntimeError("dist_checkpointing save failed") from exc
    except RuntimeError as outer:
        err = safety.explain_disk_full(outer, tmp_path, "exporting weights")
    assert isinstance(err, safety.DiskFullError) and str(tmp_path) in str(err)
    assert safety.explain_disk_full(RuntimeError("shape mismatch"), tmp_path, "x") is None


def test_the_cli_reports_a_full_disk_in_one_line(monkeypatch, caplog):
    from megatron_vespo import cli

    def boom(args):
        raise safety.DiskFullError(errno.ENOSPC, "disk full while saving checkpoint iteration 3: ...")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    args = parser.parse_args(["train", "x.yaml"])
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    args.func = boom
    assert cli.main([]) == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "disk full" in errors[0].getMessage() and errors[0].exc_info is None


# ----------------------------------------------------------------------------- untrusted pickles
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("victim", ["trainer_state.pt", "rng/rank_00000.pt"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path, monkeypatch, victim):
    monkeypatch.setattr(training, "write_model_checkpoint", _stub_writer())
    save = tmp_path / "ckpt"
    training.save_trainer_checkpoint(save, 1, model=None, hf_cfg={}, keep_last=2)
    marker = tmp_path / "marker"
    path = save / "iter_0000001" / victim
    good = torch.load(path, weights_only=False)
    key = "state" if victim == "trainer_state.pt" else "rng"
    good[key] = {"payload": _Evil(marker), **({"iteration": 1} if key == "state" else {})}
    with open(path, "wb") as fh:
        pickle.dump(good, fh)  # a plain pickle, as an attacker would write it (torch.load reads those too)
    with pytest.raises(ValueError, match="refused to load"):
        training.load_trainer_checkpoint(save, model=None)
    assert not marker.exists(), "the checkpoint ran code while loading"


def test_rng_files_of_older_checkpoints_still_load(tmp_path):
    """Before the fix numpy's state was pickled as an ndarray; weights_only allows exactly that."""
    import numpy as np

    np.random.seed(5)
    old = {"python": __import__("random").getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    (tmp_path / "rng").mkdir()
    torch.save({"world_size": 1, "rng": old}, tmp_path / "rng" / "rank_00000.pt")
    want = np.random.rand(3)
    np.random.rand(7)
    training.set_rng_state(training.read_rng_state(tmp_path))
    assert np.array_equal(np.random.rand(3), want)
    # and the new format round-trips numpy exactly too
    state = training.rng_state()
    want = np.random.rand(3)
    training.set_rng_state(state)
    assert np.array_equal(np.random.rand(3), want)


# ----------------------------------------------------------------------------- damaged safetensors to convert
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # header: the 8-byte length is intact, the JSON after it is garbage
        path.write_bytes(data[:8] + b"\x00{not json" + data[18:])


@pytest.fixture(scope="module")
def single_file_hf(tmp_path_factory):
    pytest.importorskip("transformers")
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoint"))
    from tiny_hf import make_tiny_hf

    hf = make_tiny_hf(tmp_path_factory.mktemp("hf1") / "hf", num_hidden_layers=1, max_shard_size="100MB")
    assert (hf / "model.safetensors").is_file()
    return hf


@pytest.mark.parametrize("how", ["empty", "truncated", "header"])
def test_convert_names_a_damaged_safetensors_file_and_exits_2(single_file_hf, tmp_path, how, caplog):
    import shutil

    from megatron_vespo.cli import main

    hf = shutil.copytree(single_file_hf, tmp_path / "hf")
    _damage(hf / "model.safetensors", how)
    out = tmp_path / "out"
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(hf / "model.safetensors") in errors[0], errors
    assert "Traceback" not in errors[0]
    assert not out.exists()


# ----------------------------------------------------------------------------- modes and sockets
@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640),
                                                      (0o077, 0o700, 0o600)])
def test_output_modes_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    from megatron_vespo.checkpoint.dist import dist_atomic_dir
    from megatron_vespo.utils.io import atomic_dir, atomic_path

    old = os.umask(umask)
    try:
        with dist_atomic_dir(tmp_path / "export") as d:
            (d / "model.safetensors").write_bytes(b"w")
        with atomic_dir(tmp_path / "plain") as d:
            pass
        with atomic_path(tmp_path / "pointer.txt") as fh:
            fh.write("1\n")
    finally:
        os.umask(old)
    assert (tmp_path / "export").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "plain").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "pointer.txt").stat().st_mode & 0o777 == file_mode


_PROBE = r"""
import os, torch
from megatron_vespo.train.parallel import _init_process_group
_init_process_group("gloo", 1)
t = torch.ones(1); torch.distributed.all_reduce(t)
mine = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if target.startswith("socket:["):
        mine.add(target[8:-1])
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in mine:  # LISTEN, one of this process's sockets
            print(f[1])
"""


def test_the_single_process_group_listens_on_no_external_interface(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    listening = proc.stdout.split()
    loopback = ("0100007F:", "0000000000000000FFFF00000100007F:", "00000000000000000000000001000000:")
    assert all(a.startswith(loopback) for a in listening), f"listening beyond loopback: {listening}"


def test_a_full_disk_during_a_weight_export_is_named(tmp_path):
    """Every atomic checkpoint / export directory (dist_atomic_dir) names a full disk, not only the trainer's."""
    from megatron_vespo.checkpoint.dist import dist_atomic_dir

    disk = tmp_path / "disk"
    _tiny_tmpfs(disk, "256k")
    try:
        with pytest.raises(safety.DiskFullError, match=r"disk full while writing .*v000003"):
            with dist_atomic_dir(disk / "weights" / "v000003") as d:
                with open(d / "model.safetensors", "wb") as fh:
                    fh.write(b"\0" * 512 * 1024)
                    fh.flush()
        assert list((disk / "weights").iterdir()) == []
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
