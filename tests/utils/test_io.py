"""Atomic writes leave either the old content or the new one, never a partial file/dir."""

import json

import pytest

from megatron_vespo.utils.io import atomic_dir, atomic_path, atomic_write_json


def test_atomic_write_json_replaces(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"v": 1})
    atomic_write_json(p, {"v": 2})
    assert json.loads(p.read_text()) == {"v": 2}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]


def test_atomic_path_keeps_old_content_on_error(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as fh:
            fh.write("half")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_dir(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"123")
        assert not out.exists()
    assert (out / "w.bin").read_bytes() == b"123"
    bad = tmp_path / "bad"
    with pytest.raises(ValueError):
        with atomic_dir(bad) as tmp:
            (tmp / "w.bin").write_bytes(b"1")
            raise ValueError("conversion failed")
    assert not bad.exists()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_dir(out):
            pass
