"""The pool on real GPUs: disjoint placement, LRU eviction for tp=2, memory back after stop_many.

Needs >= 2 NVIDIA GPUs; run by bench/gpu_pool_check.py on a GPU machine (CI
has none: nox -s tests leaves tests/gpu out). The engine is
tests/fakes/gpu_server.py, which holds --gib GiB on every GPU it can see.
"""
from __future__ import annotations

import requests

import pytest

HOLD = ["--gib", "4"]
REQUEST_TIMEOUT_S = 10


def _info(server) -> dict:
    return requests.get(server.base_url + "/health", timeout=REQUEST_TIMEOUT_S).json()


def _live_others(pool, server):
    return [s for s in pool.servers() if s is not server and s.record.stopped is None]


@pytest.mark.model("gpu-a", args=HOLD)
def test_a_sees_exactly_its_device(server):
    info = _info(server)
    assert info["devices"] == 1
    assert info["visible"] == ",".join(map(str, server.devices))


@pytest.mark.model("gpu-b", args=HOLD)
def test_b_is_placed_on_a_disjoint_device(server, kiln_pool):
    assert _info(server)["devices"] == 1
    for other in _live_others(kiln_pool, server):
        assert not set(other.devices) & set(server.devices), (other.devices, server.devices)


@pytest.mark.model("gpu-tp2", tp=2, args=HOLD)
def test_tp2_evicts_idle_servers_and_gets_two_devices(server, kiln_pool):
    info = _info(server)
    assert info["devices"] == 2 and len(server.devices) == 2
    assert not _live_others(kiln_pool, server), "idle tp=1 servers should have been evicted"


@pytest.mark.model("gpu-c", args=HOLD)
def test_c_after_tp2(server):
    assert _info(server)["devices"] == 1


@pytest.mark.model("gpu-d", args=[*HOLD, "--leak-grandchild", "--pid-file", "/tmp/kiln-gpu-leak.pid"])
def test_d_leaves_a_setsid_grandchild_holding_memory(server, kiln_pool):
    # Session end stops c and d together with stop_many; d's detached
    # grandchild carries the run tag, so it dies too and the memory returns.
    assert _info(server)["devices"] == 1
    assert {d for s in _live_others(kiln_pool, server) for d in s.devices}.isdisjoint(server.devices)
