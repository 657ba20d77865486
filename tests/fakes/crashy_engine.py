"""A stand-in engine for warmup tests: serves /health and /v1/completions, or misbehaves on cue.

Run as ``python tests/fakes/crashy_engine.py --port P [flags]``:
  --ready-after S         seconds before /health answers 200
  --health never          never answer /health with 200 (503 forever)
  --traceback-after S     print a Python traceback after S seconds, then KEEP RUNNING
                          (a crashed worker under a lingering parent: only a log
                          watchdog notices before the launch timeout)
  --completion hang       accept /v1/completions and never answer
  --ignore-term           ignore SIGTERM (needs SIGKILL)
  --grandchild            start a child that setsid()s and sleeps forever
  --shutdown-traceback    on SIGTERM print a traceback, then exit 0 (vLLM does
                          this on every shutdown; it is not a crash)
  --fill-cache            write a file into every *_CACHE_DIR / VLLM_CACHE_ROOT
                          directory named in the environment, like a JIT would
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

CACHE_VARS = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "VLLM_CACHE_ROOT", "DG_JIT_CACHE_DIR")
FAKE_TRACEBACK = ('Traceback (most recent call last):\n  File "worker.py", line 1, in <module>\n'
                  "RuntimeError: injected worker crash")


class _Handler(http.server.BaseHTTPRequestHandler):
    ready_at = 0.0
    healthy = True
    hang = False

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            ok = self.healthy and time.monotonic() >= self.ready_at
            self._send(200 if ok else 503, b"ok" if ok else b"not ready")
        else:
            self._send(404, b"no such path")

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path != "/v1/completions":
            self._send(404, b"no such path")
            return
        print(f"completion request for model {body.get('model')}", flush=True)
        if self.hang:
            threading.Event().wait()
        answer = {"object": "text_completion", "model": body.get("model"),
                  "choices": [{"index": 0, "text": " ok", "finish_reason": "length"}]}
        self._send(200, json.dumps(answer).encode())

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="fake")
    ap.add_argument("--ready-after", type=float, default=0.0)
    ap.add_argument("--health", choices=("ok", "never"), default="ok")
    ap.add_argument("--traceback-after", type=float, default=None)
    ap.add_argument("--completion", choices=("ok", "hang"), default="ok")
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--grandchild", action="store_true")
    ap.add_argument("--shutdown-traceback", action="store_true")
    ap.add_argument("--fill-cache", action="store_true")
    a, _unknown = ap.parse_known_args()  # launch args the harness appends are accepted and ignored
    print(f"crashy engine pid {os.getpid()} model {a.model} "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}", flush=True)
    if a.fill_cache:
        for var in CACHE_VARS:
            if os.environ.get(var):
                Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
                Path(os.environ[var], f"kernel-{os.getpid()}.bin").write_bytes(b"\0" * 64)
    if a.grandchild:
        code = "import os, threading; os.setsid(); print('grandchild', os.getpid(), flush=True); threading.Event().wait()"
        subprocess.Popen([sys.executable, "-c", code])
    if a.ignore_term:
        signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM ignored", flush=True))
    elif a.shutdown_traceback:
        def _bye(*_):
            print("shutting down\n" + FAKE_TRACEBACK, flush=True)
            os._exit(0)
        signal.signal(signal.SIGTERM, _bye)
    if a.traceback_after is not None:
        def _crash():
            print(FAKE_TRACEBACK, flush=True)
        threading.Timer(a.traceback_after, _crash).start()
    _Handler.ready_at = time.monotonic() + a.ready_after
    _Handler.healthy = a.health == "ok"
    _Handler.hang = a.completion == "hang"
    srv = _Server(("127.0.0.1", a.port), _Handler)
    print(f"serving on {a.port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
