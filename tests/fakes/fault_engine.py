"""A fault-injecting stand-in for an engine: misbehaves on cue so Server's handling is proven.

Run as ``python -m tests.fakes.fault_engine --port P --mode MODE``. Modes:
  ok            serve /health 200 (after --ready-after seconds)
  crash         print a traceback-like line and exit 3 after --ready-after seconds
  exit0         exit 0 before ever serving
  unhealthy     serve /health 503 forever
  hang          accept connections, never answer
  ignore-term   serve ok, ignore SIGTERM (needs SIGKILL)
  grandchild    serve ok; a child that calls setsid inherits the listener and
                keeps the port after this process exits
Every health request is logged as ``health N`` so tests can count polls.
"""
from __future__ import annotations

import argparse
import http.server
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    polls = 0
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            with _Handler.lock:
                _Handler.polls += 1
                print(f"health {_Handler.polls}", flush=True)
            self._send(self.status, b"ok" if self.status == 200 else b"not ready")
        elif self.path == "/v1/models":
            self._send(200, b'{"object":"list","data":[{"id":"fault","object":"model"}]}')
        else:
            self._send(404, b"no such path")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the log to our own lines
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _serve(port: int, status: int, detach_holder: bool = False) -> None:
    _Handler.status = status
    srv = _Server(("127.0.0.1", port), _Handler)
    if detach_holder:
        _detached_holder(srv.socket)
    print(f"serving on {port} status {status}", flush=True)
    srv.serve_forever()


def _hang(port: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    held = []
    print(f"accepting on {port}, answering nothing", flush=True)
    while True:
        conn, _ = sock.accept()
        held.append(conn)  # keep it open: the client waits for a reply that never comes


def _detached_holder(sock: socket.socket) -> None:
    """Start a child that setsid()s and keeps the listening socket open forever.

    Like an engine worker that inherited the listener and detached: when the
    parent dies, the port stays held by a process that is not our child.
    """
    code = ("import os, threading; os.setsid(); "
            "print('grandchild', os.getpid(), 'holds the port', flush=True); "
            "threading.Event().wait()")
    subprocess.Popen([sys.executable, "-c", code], pass_fds=(sock.fileno(),))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", default="ok")
    ap.add_argument("--ready-after", type=float, default=0.0)
    a, _engine_args = ap.parse_known_args()  # launch args meant for a real engine are accepted
    print(f"fault engine pid {os.getpid()} mode {a.mode}", flush=True)
    if a.ready_after:
        threading.Event().wait(a.ready_after)  # simulated load time
    if a.mode == "crash":
        print("Traceback (most recent call last):\nRuntimeError: injected crash", flush=True)
        # Wall-clock moment of exit, for bench/crash_detect.py.
        print(f"exit-at {time.time():.6f}", flush=True)
        os._exit(3)
    if a.mode == "exit0":
        print("exiting 0 before ready", flush=True)
        sys.exit(0)
    if a.mode == "hang":
        _hang(a.port)
    if a.mode == "ignore-term":
        signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM ignored", flush=True))
    _serve(a.port, 503 if a.mode == "unhealthy" else 200, detach_holder=a.mode == "grandchild")


if __name__ == "__main__":
    main()
