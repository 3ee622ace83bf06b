"""kill -9 at a named point of iteration k, resume, and compare with the uninterrupted run (issue 9, items 1-2).

Fast cases (CI, marker ``e2e``): the tiny config, 3 rollouts, a checkpoint every rollout:

* killed after iteration 3 trained (checkpoint 2 on disk): the resumed run's metrics rows are
  the uninterrupted run's, row for row, and its final checkpoint holds the same bytes;
* killed on the last iteration between the checkpoint directory's rename and the pointer
  update: the unconfirmed ``iter_0000003`` is replaced, the pointer reaches 3, ``keep_last``
  holds, and the rows and the final checkpoint are again the uninterrupted run's.

Every kill point at every iteration, sync and async, is the long matrix in
``test_kill_resume_matrix.py`` (``MV_FAULT_MATRIX=1 pytest -m fault_matrix tests/faults``).
"""

import pytest
from fault_runs import checkpoint_files, comparable, read_rows, train

from megatron_vespo.checkpoint.training import latest_iteration, list_iterations

pytestmark = pytest.mark.e2e

RUN = ("loop.num_rollouts=3", "checkpoint.save_interval=1", "checkpoint.keep_last=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    train(root / "out", root / "ckpt", *RUN)
    return read_rows(root / "out"), root / "ckpt"


def _assert_same_run(rows: list[dict], ckpt, reference) -> None:
    ref_rows, ref_ckpt = reference
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for got, want in zip(rows, ref_rows):
        assert comparable(got) == comparable(want), (got["step"], comparable(got), comparable(want))
    assert latest_iteration(ckpt) == 3 and list_iterations(ckpt) == [2, 3]
    # model, optimizer, RNG, trainer state: byte for byte
    assert checkpoint_files(ckpt / "iter_0000003") == checkpoint_files(ref_ckpt / "iter_0000003")


def test_kill_after_training_then_resume_is_bit_identical(reference, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    train(out, ckpt, *RUN, fault="trained@3")
    assert latest_iteration(ckpt) == 2
    # what a kill during a weight export or a config write leaves (exports are model-sized)
    (out / "weights" / ".v000003.k3j2.partial").mkdir(parents=True)
    (out / "weights" / ".v000003.k3j2.partial" / "model.safetensors").write_bytes(b"x" * 4096)
    (out / ".config.yaml.a8f1.tmp").write_text("half")
    train(out, ckpt, *RUN)
    assert not (out / "weights" / ".v000003.k3j2.partial").exists() and not (out / ".config.yaml.a8f1.tmp").exists()
    rows = read_rows(out)
    _assert_same_run(rows, ckpt, reference)
    # the seed counter and the update count continued: optimizer_step runs on without a restart
    assert [r["optimizer_step"] for r in rows if "optimizer_step" in r] == list(range(1, 13))


def test_kill_between_rename_and_pointer_on_the_last_iteration(reference, tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    train(out, ckpt, *RUN, fault="ckpt_renamed@3")
    assert latest_iteration(ckpt) == 2 and list_iterations(ckpt) == [1, 2, 3]  # 3 renamed, never confirmed
    proc = train(out, ckpt, *RUN)
    assert "written by a run killed before the pointer moved" in proc.stderr
    _assert_same_run(read_rows(out), ckpt, reference)
