"""An engine stand-in whose processes do what real engines do to escape a harness.

Real vLLM/SGLang processes call ``setproctitle`` (``VLLM::EngineCore``,
``sglang::scheduler``), which overwrites the memory ``/proc/PID/environ``
shows: kiln's environment tag is gone from them. This fake uses the real
``setproctitle`` package to do the same, and more:

    python tests/fakes/renaming_engine.py --port P [--workers N] [--daemon]
        [--self-stop] [--root-ignore-term] [--pidfile F]

* the root serves ``/health`` (200 once every helper below has renamed itself)
  and keeps its command line, like vLLM's API server;
* ``--workers N``: children renamed ``KILNFAKE::Worker_<i>`` that ignore SIGTERM;
* ``--daemon``: a double fork whose grandchild calls ``setsid``, re-executes
  itself with an EMPTY environment and renames itself ``KILNFAKE::daemon``;
* ``--self-stop``: a child renamed ``KILNFAKE::stopped`` that SIGSTOPs itself;
* ``--pidfile F``: every pid, one per line, once all are up.

Every helper blocks forever; only a signal ends it.
"""
from __future__ import annotations

import argparse
import http.server
import os
import signal
import socketserver
import subprocess
import sys
import threading

# What a scan by name must find (tests/integration/test_containment.py).
NAMES = ("KILNFAKE::", "renaming_engine.py")
HERE = os.path.abspath(__file__)


def _block() -> None:
    threading.Event().wait()  # forever: only a signal ends a helper


def _helper(role: str, ready_fd: int) -> None:
    import setproctitle  # the real package, as vLLM/SGLang use it

    if role == "daemon":
        # The grandchild after the double fork: its own session, no environment.
        os.setsid()
    setproctitle.setproctitle(f"KILNFAKE::{role}")
    if role != "stopped":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.write(ready_fd, f"{os.getpid()}\n".encode())
    os.close(ready_fd)
    if role == "stopped":
        os.kill(os.getpid(), signal.SIGSTOP)
    _block()


def _spawn(role: str, ready_w: int) -> None:
    argv = [sys.executable, HERE, "--role", role, "--ready-fd", str(ready_w)]
    if role != "daemon":
        subprocess.Popen(argv, pass_fds=(ready_w,))
        return
    if os.fork() == 0:  # first fork: exits at once, orphaning the grandchild
        if os.fork() == 0:
            os.execve(sys.executable, argv, {})  # empty environment: no tag, no PATH
        os._exit(0)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = b"ok"
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--daemon", action="store_true")
    ap.add_argument("--self-stop", action="store_true")
    ap.add_argument("--root-ignore-term", action="store_true")
    ap.add_argument("--pidfile")
    ap.add_argument("--role")
    ap.add_argument("--ready-fd", type=int)
    a = ap.parse_args()
    if a.role:
        _helper(a.role, a.ready_fd)
        return
    if a.root_ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    roles = [f"Worker_{i}" for i in range(a.workers)]
    roles += ["daemon"] if a.daemon else []
    roles += ["stopped"] if a.self_stop else []
    ready_r, ready_w = os.pipe()
    os.set_inheritable(ready_w, True)
    for role in roles:
        _spawn(role, ready_w)
    os.close(ready_w)
    pids = [os.getpid()]
    with os.fdopen(ready_r) as ready:
        for _ in roles:
            pids.append(int(ready.readline()))
    if a.pidfile:
        with open(a.pidfile + ".tmp", "w") as f:
            f.write("".join(f"{p}\n" for p in pids))
        os.replace(a.pidfile + ".tmp", a.pidfile)
    print(f"renaming engine up: pids {pids}", flush=True)
    if a.port:
        socketserver.TCPServer.allow_reuse_address = True
        with http.server.ThreadingHTTPServer(("127.0.0.1", a.port), _Health) as srv:
            srv.serve_forever()
    else:
        _block()


if __name__ == "__main__":
    main()
