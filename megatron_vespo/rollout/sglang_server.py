"""Launch (or attach to) SGLang servers from a ``RolloutConfig``.

The command is ``python -m sglang.launch_server --model-path M --host H --port P --tp-size N
[--enable-return-routed-experts] [server_args...]`` (flag names from sglang 0.5.23
``srt/arg_groups/fields``: ``ServerArgs`` field ``x_y`` is the flag ``--x-y``). Booleans in
``server_args`` become bare flags when true and are left out when false; lists repeat values
after one flag (``nargs='+'``); dicts are passed as JSON (e.g. ``json_model_override_args``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from megatron_vespo.rollout.config import RolloutConfig
from megatron_vespo.rollout.process import AttachedServer, ServerProcess

logger = logging.getLogger(__name__)


def server_args_to_flags(server_args: Mapping[str, Any]) -> list[str]:
    """Turn ``{"mem_fraction_static": 0.8, "enable_metrics": True}`` into SGLang CLI flags."""
    flags: list[str] = []
    for key, value in server_args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"rollout.server_args.{key} is an empty list; drop it or give values")
            flags.append(flag)
            flags.extend(str(v) for v in value)
        elif isinstance(value, Mapping):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def build_sglang_command(cfg: RolloutConfig, port: int, *, model_path: Optional[str] = None,
                         python: str = sys.executable, launcher: Optional[Sequence[str]] = None) -> list[str]:
    """argv of one SGLang server for ``cfg`` on ``port``.

    Args:
        cfg: rollout config (model_path, host, tp_size, return_routed_experts, server_args).
        port: HTTP port of this engine.
        model_path: overrides ``cfg.model_path``.
        python: interpreter to run SGLang with.
        launcher: replaces ``[python, "-m", "sglang.launch_server"]`` (tests use a fake server).
    """
    model = model_path or cfg.model_path
    if not model:
        raise ValueError("rollout.model_path is required to launch SGLang (an HF checkpoint dir or hub id)")
    cmd = list(launcher) if launcher else [python, "-m", "sglang.launch_server"]
    cmd += ["--model-path", str(model), "--host", cfg.host, "--port", str(int(port)), "--tp-size", str(cfg.tp_size)]
    if cfg.return_routed_experts:
        cmd.append("--enable-return-routed-experts")
    cmd += server_args_to_flags(cfg.server_args)
    return cmd


def launch_sglang_servers(cfg: RolloutConfig, *, log_dir: Optional[str] = None, model_path: Optional[str] = None,
                          launcher: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None,
                          wait: bool = True) -> list[ServerProcess]:
    """Start ``cfg.num_engines`` SGLang servers on ``base_port + i * 10`` and wait until healthy.

    With ``cfg.urls`` set, nothing is launched: use :func:`attach_servers`. On any failure the
    servers started so far are stopped before the error propagates.
    """
    if cfg.urls:
        raise ValueError("rollout.urls is set: attach to the running servers (attach_servers) instead of launching")
    logs = Path(log_dir or cfg.log_dir or "outputs/rollout_logs")
    servers: list[ServerProcess] = []
    try:
        for i in range(cfg.num_engines):
            # SGLang binds extra ports above the HTTP port (nccl, scheduler IPC): leave a gap.
            port = cfg.base_port + 10 * i
            cmd = build_sglang_command(cfg, port, model_path=model_path, launcher=launcher)
            servers.append(ServerProcess(cmd, f"http://{cfg.host}:{port}", logs / f"sglang_{i}_{port}.log",
                                         env=env).start())
        if wait:
            for s in servers:
                s.wait_healthy(cfg.launch_timeout_s)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def attach_servers(urls: Sequence[str], timeout_s: float = 60.0) -> list[AttachedServer]:
    """Handles for servers started elsewhere (``rollout.urls``), checked healthy."""
    if not urls:
        raise ValueError("attach_servers needs at least one URL (rollout.urls)")
    return [AttachedServer(u).wait_healthy(timeout_s) for u in urls]
