"""Lifecycle of a rollout server child process: start with logs to a file, health-check, stop.

The child is started in its own session (``start_new_session=True``), so its process group
contains the server and whatever it spawned (SGLang forks scheduler / detokenizer processes)
and nothing of ours. ``stop`` signals exactly that group: SIGTERM, then SIGKILL after a grace
period. No name-based killing (``pkill``) anywhere.

Engines die with the run: a child started here asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG,
SIGKILL)``, set in the child between fork and exec) to be killed when its parent dies, so a
``kill -9`` of the trainer cannot leave servers holding GPUs and ports; the kernel then closes
their listening sockets and a restarted run finds the ports free. SGLang's own scheduler and
detokenizer processes do the same towards ``launch_server`` (``kill_itself_when_parent_died``
in ``sglang/srt/utils``), so the whole tree goes. The signal fires when the *thread* that
started the child exits, so start servers from a thread that lives as long as the run (the
main thread); the embedded server also watches its parent pid (``--parent-pid``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from megatron_vespo.utils.imports import require
from megatron_vespo.utils.net import free_port as find_free_port  # noqa: F401 - public name here

logger = logging.getLogger(__name__)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent_preexec(parent_pid: int, sig: int = signal.SIGKILL):
    """A ``preexec_fn`` making the child receive ``sig`` when ``parent_pid`` (its parent) dies.

    Linux only (elsewhere it does nothing). If the parent already died between fork and the
    ``prctl`` call, the child kills itself at once instead of running orphaned.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def preexec() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # parent gone before the prctl took effect
            os.kill(os.getpid(), sig)
    return preexec


def check_health(url: str, timeout_s: float = 2.0) -> bool:
    """True when ``GET {url}/health`` answers 200."""
    httpx = require("httpx", "health checks")
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


class ServerProcess:
    """A server child process we own.

    Args:
        command: argv of the server.
        url: base URL the server will answer on.
        log_path: stdout and stderr of the child go here.
        env: extra environment variables.
    """

    def __init__(self, command: Sequence[str], url: str, log_path: str | os.PathLike,
                 env: Optional[Mapping[str, str]] = None):
        self.command = [str(c) for c in command]
        self.url = url.rstrip("/")
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        """Child pid (also its process-group id), None before ``start``."""
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        """Whether the child is running."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "ServerProcess":
        """Spawn the child with output captured to ``log_path``."""
        if self.alive():
            raise RuntimeError(f"server for {self.url} already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**os.environ, **self.env},
                                         start_new_session=True,
                                         preexec_fn=die_with_parent_preexec(os.getpid()))
        logger.info("started rollout server pid %d for %s (log: %s): %s", self.proc.pid, self.url,
                    self.log_path, " ".join(self.command))
        return self

    def log_tail(self, n_bytes: int = 4000) -> str:
        """Last bytes of the child's log (for error messages)."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_bytes:].decode("utf-8", errors="replace")

    def wait_healthy(self, timeout_s: float, interval_s: float = 0.5) -> "ServerProcess":
        """Block until ``/health`` answers 200; raise if the child dies or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"rollout server for {self.url} exited with code {self.proc.returncode} "
                                   f"before becoming healthy; log {self.log_path}:\n{self.log_tail()}")
            if check_health(self.url):
                logger.info("rollout server %s is healthy", self.url)
                return self
            time.sleep(interval_s)
        self.stop()
        raise TimeoutError(f"rollout server for {self.url} not healthy after {timeout_s}s (stopped it); "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace_s: float = 15.0) -> Optional[int]:
        """Terminate the child's process group (SIGTERM, then SIGKILL); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("rollout server pid %d ignored SIGTERM for %.0fs; sending SIGKILL", self.proc.pid,
                               grace_s)
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=grace_s)
        # Children of the server (same group) may outlive it; clean up the group we created.
        self._signal_group(signal.SIGKILL)
        return self.proc.returncode

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)  # group id == child pid (start_new_session)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AttachedServer:
    """A server someone else runs: same ``url``/``stop`` interface, ``stop`` leaves it alone."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.pid = None

    def wait_healthy(self, timeout_s: float, interval_s: float = 0.5) -> "AttachedServer":
        """Block until ``/health`` answers 200 or raise TimeoutError naming the URL."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check_health(self.url):
                return self
            time.sleep(interval_s)
        raise TimeoutError(f"rollout server at {self.url} (attach mode) not healthy after {timeout_s}s")

    def alive(self) -> bool:
        """Whether the server answers ``/health``."""
        return check_health(self.url)

    def stop(self, grace_s: float = 0.0) -> None:
        """Nothing to do: we do not own this server."""
        return None
