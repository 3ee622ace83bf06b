"""A trainer-like parent for the orphaned-engine test: start 2 engines, write where they are, wait to be killed.

argv: KIND (embedded | sglang) OUT_JSON. ``sglang`` starts the fake SGLang launcher of
tests/rollout through ``launch_sglang_servers`` (no watchdog of its own: only the parent-death
signal can stop it); ``embedded`` starts two embedded servers in process mode.
"""

import json
import os
import sys
import time
from pathlib import Path

kind, out = sys.argv[1], Path(sys.argv[2])
if kind == "sglang":
    from megatron_vespo.rollout.config import RolloutConfig
    from megatron_vespo.rollout.sglang_server import launch_sglang_servers
    from megatron_vespo.utils.net import free_port

    fake = [sys.executable, str(Path(__file__).parents[1] / "rollout" / "fake_sglang_server.py")]
    cfg = RolloutConfig(engine="sglang", model_path="/fake/model", num_engines=2, base_port=free_port() // 20 * 10,
                        launch_timeout_s=60)
    handles = launch_sglang_servers(cfg, log_dir=str(out.parent / "logs"), launcher=fake)
else:
    from megatron_vespo.rollout.embedded.server import start_embedded_server

    handles = [start_embedded_server(preset="tiny", mode="process", random_seed=i,
                                     log_path=str(out.parent / f"embedded_{i}.log")) for i in range(2)]
tmp = out.with_suffix(".tmp")
tmp.write_text(json.dumps({"pid": os.getpid(), "servers": [{"pid": h.pid, "url": h.url} for h in handles]}))
os.replace(tmp, out)
while True:  # the test kills us with SIGKILL: no cleanup code runs
    time.sleep(1)
