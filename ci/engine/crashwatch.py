"""A watchdog that tails a server's log and ends the launch at the first crash signature.

A crashed engine whose parent lingers (a worker died, the API server waits
for it) would otherwise hold a launch until its full timeout: 10 minutes on a
GPU runner for a failure its log announced in the first seconds (sglang #24253
added a watchdog thread for this). The watchdog stops the server's own tagged
tree through ``Server.terminate`` (SIGTERM, grace, SIGKILL of tagged
survivors), never anything by name.
"""
from __future__ import annotations

import logging
import re
import threading
import time

from ci.engine.server import Server
from ci.text import ansi

log = logging.getLogger(__name__)

# New log lines are read this often: a crash ends the launch within a second,
# and a chatty engine costs one small read per interval.
WATCH_INTERVAL_S = 0.2
# Not anchored: vLLM prefixes every line with "(APIServer pid=N) ERROR ...".
CRASH_SIGNATURES = (
    ("Traceback", re.compile(r"Traceback \(most recent call last\)")),
    ("CUDA error", re.compile(r"\bCUDA error\b|\bCUDA_ERROR_[A-Z_]+")),
    ("segfault", re.compile(r"Segmentation fault|\bSIGSEGV\b")),
    ("out of memory", re.compile(r"(?i)\bout of memory\b|OutOfMemoryError")),
    ("fatal", re.compile(r"Fatal Python error")),
)
# Lines with a signature's words that are not crashes (sglang warns it is
# "reducing max_m ... to avoid out of memory" and carries on).
BENIGN = re.compile(r"(?i)avoid(?:ing)? out of memory")
# An engine that logs a traceback and exits on its own is best reported by its
# exit (code + log tail); the watch waits this long for that before it stops
# the tree itself. The exit reaches kiln through the supervisor in milliseconds.
SELF_EXIT_GRACE_S = 0.5


def crash_signature(line: str) -> str | None:
    """The name of the crash signature ``line`` carries, or None."""
    if BENIGN.search(line):
        return None
    return next((name for name, rx in CRASH_SIGNATURES if rx.search(line)), None)


class CrashWatch:
    """Tails ``server.log_path``; on a crash signature it stops the server's tree at once.

    ``fired`` is then (signature, line). Call ``stop()`` before stopping the
    server yourself: engines log tracebacks while shutting down (vLLM's
    AsyncLLM output_handler does on every SIGTERM), and those are not crashes.
    """

    def __init__(self, server: Server, interval_s: float = WATCH_INTERVAL_S):
        self.server = server
        self.interval_s = interval_s
        self.fired: tuple[str, str] | None = None
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"crashwatch-{server.key}"[:60], daemon=True)

    def start(self) -> "CrashWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (waits while a triggered stop of the tree is still running)."""
        self._quit.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        offset, partial = 0, ""
        while not self._quit.wait(self.interval_s):
            try:
                with open(self.server.log_path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue  # not launched yet
            offset += len(data)
            # A line still being written stays in ``partial`` until its newline.
            lines = (partial + ansi.strip(data.decode("utf-8", errors="replace"))).split("\n")
            partial = lines.pop()
            for line in lines:
                name = crash_signature(line)
                if name and not self._quit.is_set():
                    if not self._exits_by_itself():
                        self._fire(name, line.strip())
                    return

    def _exits_by_itself(self) -> bool:
        deadline = time.monotonic() + SELF_EXIT_GRACE_S
        while time.monotonic() < deadline and not self._quit.is_set():
            code = self.server.exit_code()
            if code is not None:
                log.info("crash signature in %s, and the engine exited by itself (code %s)",
                         self.server.key, code)
                return True
            self._quit.wait(0.02)  # bounded poll on the exit
        return False

    def _fire(self, name: str, line: str) -> None:
        self.fired = (name, line[:300])
        log.error("crash signature (%s) in %s: %s; stopping its process tree now", name, self.server.key, line[:300])
        # Server.terminate() on a server whose tree is not yet assigned would
        # only mark it stopped; the tree is set right after spawn, so wait for it.
        while not self.server.launched() and not self._quit.wait(self.interval_s):
            pass
        self.server.terminate()
