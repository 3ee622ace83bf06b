"""Engines started by a run die with it: kill -9 of the parent leaves no server and no bound port.

A trainer-like parent (``_orphan_parent.py``) starts two engines -- embedded servers in process
mode, or the fake SGLang launcher through ``launch_sglang_servers`` -- writes their pids and
URLs, and is killed with SIGKILL (no ``finally``, no atexit). Within a bound the engines must
be gone and their ports bindable again, so a restarted run can take them.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

PARENT = Path(__file__).with_name("_orphan_parent.py")
BOUND_S = 60.0  # liveness bound, not a speed target: the kernel signal is immediate, the watch polls 0.5 s


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as dead)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return any(st not in ("Z", "X") for st in states)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
@pytest.mark.parametrize("kind", ["sglang", "embedded"])
def test_engines_die_with_a_killed_parent_and_free_their_ports(tmp_path, kind):
    out = tmp_path / "engines.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parent = subprocess.Popen([sys.executable, str(PARENT), kind, str(out)], env=env,
                              stdout=open(tmp_path / "parent.log", "wb"), stderr=subprocess.STDOUT)
    servers = []
    try:
        deadline = time.monotonic() + 240
        while not out.exists():  # driven by the file appearing, not by a timer
            assert parent.poll() is None, (tmp_path / "parent.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "engines did not start"
            time.sleep(0.2)
        servers = json.loads(out.read_text())["servers"]
        assert len(servers) == 2 and all(_alive(s["pid"]) for s in servers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        ports = [(urlparse(s["url"]).hostname, urlparse(s["url"]).port) for s in servers]
        deadline = time.monotonic() + BOUND_S
        # a killed multi-threaded process shows as a zombie leader while its other threads still
        # tear down (and hold its sockets): wait for both conditions
        while time.monotonic() < deadline and (any(_alive(s["pid"]) for s in servers)
                                               or not all(_port_free(*hp) for hp in ports)):
            time.sleep(0.1)
        assert not [s for s in servers if _alive(s["pid"])], "engines outlived the killed run"
        for s, hp in zip(servers, ports):
            assert _port_free(*hp), (f"port of {s['url']} still bound:\n"
                                     + subprocess.run(["ss", "-tlnp"], capture_output=True, text=True).stdout)
    finally:
        if parent.poll() is None:
            parent.kill()
        for s in servers:  # only the pids this test started
            if _alive(s["pid"]):
                os.killpg(s["pid"], signal.SIGKILL)


CHILD = ("import os, sys, time; from megatron_vespo.rollout.embedded.guards import watch_parent; "
         "watch_parent(os.getppid(), interval_s=0.1); open(sys.argv[1], 'w').write('watching'); time.sleep(600)")
MIDDLE = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[3]]); "
          "open(sys.argv[2], 'w').write(str(c.pid)); time.sleep(600)")


def test_parent_watch_alone_stops_the_server_process(tmp_path):
    """Without the parent-death signal (plain Popen), the embedded server's parent watch still ends it."""
    pidfile = tmp_path / "child.pid"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ready = tmp_path / "watching"
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, CHILD, str(pidfile), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not pidfile.exists() or not pidfile.read_text():  # the child watches now
            assert time.monotonic() < deadline and middle.poll() is None
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert _alive(child)
        middle.kill()
        middle.wait(timeout=30)
        deadline = time.monotonic() + BOUND_S
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the watched process outlived its parent"
    finally:
        if middle.poll() is None:
            middle.kill()
        if pidfile.exists() and pidfile.read_text() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
