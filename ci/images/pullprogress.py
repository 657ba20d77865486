"""What an image pull has done so far, from dockerd's progress stream, said every few seconds.

A pull of a GPU image (tens of GB) runs for minutes; dockerd streams one JSON
message per layer event, which kiln used to log at debug level only, so the CI
log stayed silent until the pull ended. ``PullProgress`` folds the messages into
layers done / known and bytes downloaded / total; ``reporting`` says that summary
every ``PROGRESS_INTERVAL_S`` from a timer thread, so a stalled registry (no
messages at all) is heard too (issue 14: a line at least every 15 s).
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

# Issue 14 asks for a line at least every 15 s; 10 s keeps that on a loaded runner.
PROGRESS_INTERVAL_S = 10.0
# The timer thread only waits on an Event; it ends within this of being told to.
JOIN_TIMEOUT_S = 5.0
# Layer events after which a layer needs nothing more from the registry.
DONE_STATUSES = frozenset({"Pull complete", "Already exists", "Download complete"})
# Messages about the image as a whole, not a layer (their id is the tag).
IMAGE_STATUS_PREFIXES = ("Pulling from", "Digest:", "Status:")
MB = 1e6


class PullProgress:
    """Layers and bytes of one pull; fed from the stream, read from the timer thread."""

    def __init__(self, ref: str, clock: Callable[[], float] = time.monotonic):
        self.ref = ref
        self._clock = clock
        self._lock = threading.Lock()
        self._layers: set[str] = set()
        self._done: set[str] = set()
        self._current: dict[str, int] = {}
        self._total: dict[str, int] = {}
        self.started = self.last_event = clock()

    def update(self, msg: dict) -> None:
        """Fold one dockerd progress message in."""
        layer, status = msg.get("id"), msg.get("status", "")
        with self._lock:
            self.last_event = self._clock()
            if not layer or status.startswith(IMAGE_STATUS_PREFIXES):
                return
            self._layers.add(layer)
            detail = msg.get("progressDetail") or {}
            if status == "Downloading" and detail.get("total"):
                self._current[layer] = int(detail.get("current", 0))
                self._total[layer] = int(detail["total"])
            if status in DONE_STATUSES:
                self._done.add(layer)
                if layer in self._total:
                    self._current[layer] = self._total[layer]

    def summary(self) -> str:
        """``pull REF: 3/5 layers done, 120.4 of 300.0 MB downloaded (42 s; last event 1 s ago)``."""
        with self._lock:
            done, layers = len(self._done), len(self._layers)
            got, size = sum(self._current.values()), sum(self._total.values())
            now = self._clock()
            quiet = now - self.last_event
        return (f"pull {self.ref}: {done}/{layers} layers done, {got / MB:.1f} of {size / MB:.1f} MB "
                f"downloaded ({now - self.started:.0f} s; last event {quiet:.0f} s ago)")


@contextlib.contextmanager
def reporting(progress: PullProgress, emit: Callable[[str], None],
              interval_s: float = PROGRESS_INTERVAL_S) -> Iterator[PullProgress]:
    """Call ``emit(progress.summary())`` every ``interval_s`` until the block ends, stalls included."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(interval_s):
            emit(progress.summary())

    timer = threading.Thread(target=tick, name=f"pull-progress {progress.ref}", daemon=True)
    timer.start()
    try:
        yield progress
    finally:
        stop.set()
        timer.join(JOIN_TIMEOUT_S)
