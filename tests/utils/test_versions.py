"""Version pins: start-up check against the tested ranges, and broken installs fail the test run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vespo.utils import versions
from megatron_vespo.utils.versions import (
    UnsupportedVersionError,
    broken_installs,
    check_versions,
    in_range,
    parse_version,
)

REPO = Path(__file__).resolve().parents[2]


def test_parse_version():
    assert parse_version("0.16.1") == (0, 16, 1)
    assert parse_version("0.16.1rc2") == (0, 16, 1)
    assert parse_version("2.13.0+cpu") == (2, 13, 0)
    assert parse_version("5.0.0.dev0") == (5, 0, 0)
    with pytest.raises(ValueError):
        parse_version("main")


@pytest.mark.parametrize("version,ok", [("0.16.1", True), ("0.16.5", True), ("0.16.0", False), ("0.17.0", False),
                                        ("0.19.2", False)])
def test_megatron_core_range(version, ok):
    assert in_range(version, "megatron-core") is ok


@pytest.mark.parametrize("version,ok", [("4.57.1", False), ("5.0.0", True), ("5.24.0", True), ("6.0.0", False)])
def test_transformers_range(version, ok):
    assert in_range(version, "transformers") is ok


def test_out_of_range_names_package_and_range(monkeypatch):
    monkeypatch.delenv(versions.SKIP_ENV, raising=False)
    monkeypatch.setattr(versions, "installed_version", lambda d: {"megatron-core": "0.19.2"}.get(d))
    with pytest.raises(UnsupportedVersionError, match=r"megatron-core 0.19.2 .* megatron-core>=0.16.1,<0.17"):
        check_versions()
    monkeypatch.setenv(versions.SKIP_ENV, "1")
    assert check_versions()["megatron-core"] == "0.19.2"


def test_absent_packages_pass(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda d: None)
    assert check_versions() == {"megatron-core": None, "transformers": None}


def test_this_environment_is_supported():
    check_versions()


def test_broken_install_is_reported_absent_is_not(monkeypatch):
    real = versions.importlib.import_module

    def fake_import(name, *a, **k):
        if name == "megatron.core":
            raise ImportError("libfoo.so: cannot open shared object file")
        return real(name, *a, **k)

    monkeypatch.setattr(versions.importlib, "import_module", fake_import)
    monkeypatch.setattr(versions, "installed_version", lambda d: "0.16.1")
    assert list(broken_installs()) == ["megatron-core"]
    monkeypatch.setattr(versions, "installed_version", lambda d: None)
    monkeypatch.setattr(versions.importlib.util, "find_spec", lambda name: None)
    assert broken_installs() == {}


def test_test_session_fails_when_megatron_core_is_installed_but_broken(tmp_path):
    """A shadowing megatron.core that raises on import: the session must fail, not skip ~60 tests."""
    pkg = tmp_path / "megatron" / "core"
    pkg.mkdir(parents=True)
    (tmp_path / "megatron" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("raise ImportError('simulated broken megatron-core build')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "utils" / "test_io.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "simulated broken megatron-core build" in proc.stdout + proc.stderr
