"""Stand-in for ``python -m sglang.launch_server`` in launcher tests (stdlib only).

Reads ``--host``/``--port`` from the argv the launcher built, records the argv, and serves
``/health``. ``FAKE_SGLANG_MODE``: ``ok`` (default), ``exit`` (dies with code 3),
``nohealth`` (never answers 200), ``spawn`` (also starts a sleeping grandchild, pid written to
``FAKE_SGLANG_PIDFILE``, to check the whole process group is stopped).
"""

import http.server
import json
import os
import subprocess
import sys
import time

argv = sys.argv[1:]
host = argv[argv.index("--host") + 1]
port = int(argv[argv.index("--port") + 1])
mode = os.environ.get("FAKE_SGLANG_MODE", "ok")
record = os.environ.get("FAKE_SGLANG_ARGV_FILE")
if record:
    with open(record, "w") as fh:
        json.dump(argv, fh)
print(f"fake sglang starting on {host}:{port} mode={mode}", flush=True)
if mode == "exit":
    print("fatal: CUDA not available", flush=True)
    sys.exit(3)
if mode == "spawn":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["FAKE_SGLANG_PIDFILE"], "w") as fh:
        fh.write(str(child.pid))


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        ok = self.path == "/health" and mode != "nohealth"
        self.send_response(200 if ok else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


if mode == "nohealth":
    time.sleep(0.2)
http.server.HTTPServer((host, port), Handler).serve_forever()
