"""Local HTTP stand-ins for tests: a handler served on 127.0.0.1 from a thread, and a closed port.

The index probes (ci.install.pipconfig, ci.install.locks) and the GitHub client
(ci.report.github) are tested against servers of this kind; nothing leaves
127.0.0.1.
"""
from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

# serve_forever checks for shutdown once per interval; its 0.5 s default made
# every test's teardown half a second long.
SERVER_POLL_S = 0.02
# How long teardown waits for the server thread to end.
SERVE_TIMEOUT_S = 10


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` while ``handler`` answers there; shut down and joined afterwards."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(SERVER_POLL_S,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(SERVE_TIMEOUT_S)


def closed_port() -> int:
    """A port nobody listens on: bound, noted, closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
