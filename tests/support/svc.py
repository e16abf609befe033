"""A test service: answers HTTP with its node and epoch, and records when it ran.

Each run writes ``<record-dir>/<pid>.log``: ``start``, a ``hb`` line every 20 ms and
``end`` on SIGTERM, all on the machine-wide monotonic clock, so a checker can prove
that no two nodes of a pair ever ran the service at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HEARTBEAT_S = 0.02


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--service", required=True)
    p.add_argument("--pair", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--epoch", default="")
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--sick-flag", help="while this file exists, answer 500")
    args = p.parse_args()

    started = time.monotonic()
    path = os.path.join(args.record, f"{os.getpid()}.log")
    out = open(path, "a", buffering=1)  # noqa: SIM115
    out.write(
        json.dumps(
            {
                "start": started,
                "service": args.service,
                "pair": args.pair,
                "node": args.node,
                "epoch": args.epoch,
                "pid": os.getpid(),
            }
        )
        + "\n"
    )
    lock = threading.Lock()

    def stop(_sig: int, _frame: object) -> None:
        with lock:
            out.write(json.dumps({"end": time.monotonic()}) + "\n")
            out.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)

    def escape(_sig: int, _frame: object) -> None:
        """SIGUSR1: leave a grandchild in a session of its own, as a service that
        double-forks and calls setsid would; it records itself as another run."""
        service = os.getpid()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                _escaped(args, service)
            os._exit(0)

    signal.signal(signal.SIGUSR1, escape)

    def heartbeat() -> None:
        while True:
            with lock:
                out.write(json.dumps({"hb": time.monotonic()}) + "\n")
            time.sleep(HEARTBEAT_S)

    threading.Thread(target=heartbeat, daemon=True).start()
    body = json.dumps({"service": args.service, "node": args.node, "epoch": args.epoch}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if args.sick_flag and os.path.exists(args.sick_flag):
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    finally:
        sys.exit(1)


def _own_cgroup() -> str | None:
    """This process's cgroup v2 path (below the hierarchy's mount), if any."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return next((line[3:] for line in lines if line.startswith("0::")), None)


ESCAPED_LIFE_S = 8.0  # bounded, so a run that escaped its fencing ends by itself


def _escaped(args: argparse.Namespace, service: int) -> None:
    """The escaped grandchild: its own record, heartbeats, and an end of its own."""
    try:
        started = time.monotonic()
        head = {"start": started, "service": args.service, "pair": args.pair}
        head |= {"node": args.node, "epoch": args.epoch, "pid": os.getpid(), "escaped": True}
        head["of"] = service  # part of that run of the service
        head["cgroup"] = _own_cgroup()  # its service's: the agent logs when it is empty
        with open(os.path.join(args.record, f"{os.getpid()}.log"), "a", buffering=1) as out:
            out.write(json.dumps(head) + "\n")
            while time.monotonic() - started < ESCAPED_LIFE_S:
                time.sleep(HEARTBEAT_S)
                out.write(json.dumps({"hb": time.monotonic()}) + "\n")
            out.write(json.dumps({"end": time.monotonic()}) + "\n")
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
