"""The demo's small web service: serves the directory it is started in over HTTP.

    python3 demo_web.py PORT ADDRESS

The demo runs it from a package it builds (``demo-web-1.0.tar.gz``, this file alone),
installed by every node's agent, in each node's own directory, whose page names the
node: a client sees which node answered.
"""

from __future__ import annotations

import http.server
import sys


def main(argv: list[str]) -> None:
    port, address = int(argv[0]), argv[1]
    server = http.server.ThreadingHTTPServer((address, port), http.server.SimpleHTTPRequestHandler)
    print(f"serving {address}:{port}", flush=True)
    with server:
        server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
