"""A GPU test server: holds memory on every visible GPU and serves /health and /metrics.

    python tests/fakes/gpu_server.py --port 8000 --gib 20 [--leak-grandchild --pid-file F]

It allocates ``--gib`` GiB with torch on each GPU it can see (so
CUDA_VISIBLE_DEVICES decides where), then answers ``GET /health`` (200, JSON)
and ``GET /metrics`` (Prometheus text) on 127.0.0.1. ``--leak-grandchild``
first starts a child in a new session (setsid) that holds its own GPU memory
and outlives this process, the way an engine's stray worker does; the child
writes "<pid> ready" to ``--pid-file`` once its memory is allocated. Both
processes exit on their own after ``--max-lifetime-s`` so a failed test can
never leave GPU memory held for good.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GIB = 1024 ** 3
# Upper bound on how long either process lives: longer than any bench or test
# that uses it, short enough that a leak cannot outlast the machine's lease.
MAX_LIFETIME_S = 900.0
# A CUDA context plus a few GiB allocates in seconds; a minute means broken.
GRANDCHILD_READY_TIMEOUT_S = 60.0
READY_POLL_S = 0.02


def allocate(gib: float) -> list:
    """Hold ``gib`` GiB on every visible GPU; returns the tensors (keep them alive)."""
    import torch  # only here: the module must import without torch for --help and tests

    count = torch.cuda.device_count()
    if count == 0:
        raise SystemExit("gpu_server: no visible CUDA device (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    # zeros, not empty: touching the pages makes the allocation real on every driver.
    held = [torch.zeros(int(gib * GIB), dtype=torch.uint8, device=f"cuda:{i}") for i in range(count)]
    torch.cuda.synchronize()
    return held


def start_grandchild(args: argparse.Namespace) -> subprocess.Popen:
    """Start the setsid child and wait until it reports its memory held."""
    pid_file = Path(args.pid_file)
    pid_file.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, __file__, "--grandchild", "--gib", str(args.grandchild_gib),
         "--pid-file", str(pid_file), "--max-lifetime-s", str(args.max_lifetime_s)],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + GRANDCHILD_READY_TIMEOUT_S
    while not (pid_file.exists() and pid_file.read_text().endswith("ready")):
        if child.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"gpu_server: grandchild failed to get ready (exit {child.poll()})")
        threading.Event().wait(READY_POLL_S)
    return child


def serve(args: argparse.Namespace, held: list, stop: threading.Event) -> None:
    per_device = int(args.gib * GIB)
    info = {"pid": os.getpid(), "devices": len(held), "bytes_per_device": per_device,
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path == "/health":
                body, ctype = json.dumps(info).encode(), "application/json"
            elif self.path == "/metrics":
                lines = ["# TYPE kiln_fake_gpu_bytes gauge"]
                lines += [f'kiln_fake_gpu_bytes{{device="{i}"}} {per_device}' for i in range(len(held))]
                body, ctype = ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *a):
            sys.stderr.write("gpu_server: " + fmt % a + "\n")

    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(f"gpu_server: pid {os.getpid()} holds {args.gib} GiB on {len(held)} GPU(s); "
          f"serving on 127.0.0.1:{args.port}", flush=True)
    stop.wait(args.max_lifetime_s)
    httpd.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int)
    p.add_argument("--gib", type=float, default=1.0, help="GiB held on each visible GPU")
    p.add_argument("--leak-grandchild", action="store_true", help="leave a setsid child holding memory")
    p.add_argument("--grandchild-gib", type=float, default=2.0)
    p.add_argument("--pid-file", default="gpu_server.grandchild.pid")
    p.add_argument("--max-lifetime-s", type=float, default=MAX_LIFETIME_S)
    p.add_argument("--grandchild", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    held = allocate(args.gib)
    if args.grandchild:
        Path(args.pid_file).write_text(f"{os.getpid()} ready")
        stop.wait(args.max_lifetime_s)
        return 0
    if args.port is None:
        p.error("--port is required")
    if args.leak_grandchild:
        start_grandchild(args)  # deliberately not waited for: it is the leak
    serve(args, held, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
