"""ci.pullprogress: layers and bytes from dockerd's pull stream, said at most every interval."""
from __future__ import annotations

from ci.pullprogress import PullProgress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_summary_counts_layers_and_bytes_and_is_rate_limited():
    clock = Clock()
    p = PullProgress("reg:5000/kiln/engine:1", interval_s=10.0, clock=clock)
    stream = [
        {"status": "Pulling from kiln/engine", "id": "1"},
        {"status": "Pulling fs layer", "id": "a"},
        {"status": "Pulling fs layer", "id": "b"},
        {"status": "Already exists", "id": "c"},
        {"status": "Downloading", "id": "a", "progressDetail": {"current": 2_000_000, "total": 10_000_000}},
        {"status": "Downloading", "id": "b", "progressDetail": {"current": 500_000, "total": 5_000_000}},
    ]
    assert [p.update(m) for m in stream] == [None] * len(stream)  # nothing before the interval
    clock.now += 10.0
    line = p.update({"status": "Downloading", "id": "a", "progressDetail": {"current": 4_000_000,
                                                                          "total": 10_000_000}})
    assert line == "pull reg:5000/kiln/engine:1: 1/3 layers done, 4.5 of 15.0 MB downloaded (10 s)"
    clock.now += 3.0
    assert p.update({"status": "Pull complete", "id": "a"}) is None  # 3 s since the last line
    clock.now += 7.0
    assert p.update({"status": "Download complete", "id": "b"}) == (
        "pull reg:5000/kiln/engine:1: 3/3 layers done, 15.0 of 15.0 MB downloaded (20 s)")


def test_image_level_messages_are_not_layers():
    clock = Clock()
    p = PullProgress("x", interval_s=0.0, clock=clock)
    p.update({"status": "Digest: sha256:abc", "id": "1"})
    assert p.update({"status": "Status: Downloaded newer image for x", "id": "1"}).startswith("pull x: 0/0 layers")
