"""ci.images.pullprogress: layers and bytes from dockerd's pull stream, said on a timer, stalls included."""
from __future__ import annotations

import threading

from ci.images.pullprogress import PullProgress, reporting

# A real thread ticks on this interval; the test waits (bounded) for its lines.
TICK_S = 0.05
WAIT_S = 10.0


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_summary_counts_layers_and_bytes():
    clock = Clock()
    p = PullProgress("reg:5000/kiln/engine:1", clock=clock)
    for msg in [
        {"status": "Pulling from kiln/engine", "id": "1"},
        {"status": "Pulling fs layer", "id": "a"},
        {"status": "Pulling fs layer", "id": "b"},
        {"status": "Already exists", "id": "c"},
        {"status": "Downloading", "id": "a", "progressDetail": {"current": 2_000_000, "total": 10_000_000}},
        {"status": "Downloading", "id": "b", "progressDetail": {"current": 500_000, "total": 5_000_000}},
    ]:
        p.update(msg)
    clock.now += 12.0
    assert p.summary() == ("pull reg:5000/kiln/engine:1: 1/3 layers done, 2.5 of 15.0 MB downloaded "
                           "(12 s; last event 12 s ago)")
    p.update({"status": "Pull complete", "id": "a"})
    p.update({"status": "Download complete", "id": "b"})
    p.update({"status": "Digest: sha256:abc", "id": "1"})  # about the image, not a layer
    clock.now += 3.0
    assert p.summary() == ("pull reg:5000/kiln/engine:1: 3/3 layers done, 15.0 of 15.0 MB downloaded "
                           "(15 s; last event 3 s ago)")


def test_reporting_speaks_on_a_timer_even_when_the_stream_is_silent_and_stops_after():
    lines: list[str] = []
    got_two = threading.Event()

    def emit(line: str) -> None:
        lines.append(line)
        if len(lines) >= 2:
            got_two.set()

    with reporting(PullProgress("x"), emit, interval_s=TICK_S) as progress:
        progress.update({"status": "Pulling fs layer", "id": "a"})
        # No further message: a stalled registry must still be heard.
        assert got_two.wait(WAIT_S), lines
    assert all(ln.startswith("pull x: 0/1 layers done") for ln in lines)
    # The block joined its timer: nothing can speak for this pull any more.
    assert not any(t.name == "pull-progress x" for t in threading.enumerate())
