"""Receive-only stand-in of an SGLang engine for the distributed weight sync (tests and benchmarks).

It speaks the weight-sync endpoints (``/server_info``, ``/init_weights_update_group``,
``/begin_weight_update``, ``/update_weights_from_distributed``, ``/end_weight_update``,
``/destroy_weights_update_group``) and receives the broadcasts over gloo, but serves no model:
it records the sum and shape of each tensor (``GET /received``). Two ways to join:

* ``--join first-update`` (default): the way SGLang joins with NCCL. Its
  ``/init_weights_update_group`` (``init_custom_process_group`` without ``device_id``, sglang
  0.5.23 ``utils/common.py``) only connects to the rendezvous store; NCCL forms the communicator
  inside the first collective, which the engine runs when it receives the first
  ``/update_weights_from_distributed`` request. Here the gloo backend (which blocks until the
  trainer's side exists) is built only inside that request (``tests/weight_sync/test_group_ordering.py``).
* ``--join init``: the gloo backend is built inside ``/init_weights_update_group`` (what SGLang
  does with gloo); ``tools/bench_weight_sync.py`` uses it to time the trainer's side of a sync
  without an engine's model load.

``--version`` is what ``/server_info`` reports; with a version below 0.5.21 there are no
``/begin_weight_update`` / ``/end_weight_update`` endpoints (404), from 0.5.21 on updates are
refused outside such a window, as in sglang. ``GET /received`` returns ``{name: [sum, shape]}`` of
what arrived.

Usage: python tools/ws_stand_in_engine.py --port P [--version 0.5.20] [--join first-update|init]
"""

import argparse
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class State:
    def __init__(self, version: str, join_at_init: bool = False) -> None:
        self.version, self.join_at_init = version, join_at_init
        self.windows = tuple(int(x) for x in version.split(".")[:3]) >= (0, 5, 21)
        self.window_open, self.store, self.init, self.pg = False, None, None, None
        self.received: dict = {}
        self.lock = threading.Lock()

    def join(self, body: dict) -> None:
        from torch.distributed.rendezvous import rendezvous

        timeout = timedelta(seconds=60)
        rank = int(body["rank_offset"])
        self.store, _, _ = next(rendezvous(f"tcp://{body['master_address']}:{int(body['master_port'])}", rank,
                                           int(body["world_size"]), timeout=timeout))
        self.init = (rank, int(body["world_size"]), body.get("group_name", "weight_update_group"))
        self.pg = None
        if self.join_at_init:
            self.connect()

    def connect(self) -> None:
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

        rank, world, name = self.init
        self.pg, _ = _new_process_group_helper(world, rank, [], Backend("gloo"), PrefixStore(name, self.store),
                                               group_name=name, timeout=timedelta(seconds=600))
        _world.pg_group_ranks[self.pg] = {i: i for i in range(world)}

    def receive(self, body: dict) -> None:
        from megatron_vespo.wire import parse_dtype, reconstruct_flattened

        if self.pg is None:  # NCCL's lazy communicator: formed by the first collective, here
            self.connect()
        meta = [(n, parse_dtype(d), s) for n, d, s in zip(body["names"], body["dtypes"], body["shapes"])]
        if body.get("load_format") == "flattened_bucket":
            flat = torch.empty(sum(torch.Size(s).numel() * d.itemsize for _, d, s in meta), dtype=torch.uint8)
            torch.distributed.broadcast(flat, group_src=0, group=self.pg)
            named = reconstruct_flattened(flat, meta)
        else:
            named = [(n, torch.empty(s, dtype=d)) for n, d, s in meta]
            for _, t in named:
                torch.distributed.broadcast(t, group_src=0, group=self.pg)
        for n, t in named:
            self.received[n] = [float(t.double().sum()), list(t.shape)]


def make_handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def reply(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def answer(self, ok: bool, msg: str) -> None:
            self.reply(200 if ok else 400, {"success": ok, "message": msg})

        def do_GET(self):
            if self.path == "/health":
                return self.reply(200, {})
            if self.path in ("/server_info", "/get_server_info"):
                return self.reply(200, {"tp_size": 1, "version": state.version})
            if self.path == "/received":
                return self.reply(200, state.received)
            self.reply(404, {"detail": "Not Found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self.path == "/init_weights_update_group":
                state.join(body)
                return self.answer(True, "Succeeded to initialize custom process group.")
            if self.path == "/destroy_weights_update_group":
                if state.pg is None:
                    return self.answer(False, "The group to be destroyed does not exist.")
                torch.distributed.destroy_process_group(state.pg)
                state.pg = None
                return self.answer(True, "Succeeded to destroy custom process group.")
            if self.path in ("/begin_weight_update", "/end_weight_update") and state.windows:
                opening = self.path == "/begin_weight_update"
                if state.window_open == opening:
                    return self.answer(False, "window already open" if opening else "no window open")
                state.window_open = opening
                return self.answer(True, "Success")
            if self.path == "/update_weights_from_distributed":
                if state.windows and not state.window_open:
                    return self.answer(False, "update_weights_from_distributed must run between "
                                              "begin_weight_update() and end_weight_update()")
                with state.lock:
                    state.receive(body)
                return self.answer(True, "Succeeded to update parameter online.")
            self.reply(404, {"detail": "Not Found"})

    return Handler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--version", default="0.5.20", help="what /server_info reports (>= 0.5.21: windows)")
    ap.add_argument("--join", choices=["first-update", "init"], default="first-update")
    args = ap.parse_args()
    state = State(args.version, join_at_init=args.join == "init")
    ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state)).serve_forever()


if __name__ == "__main__":
    main()
