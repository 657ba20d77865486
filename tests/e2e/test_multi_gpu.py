"""Several GPUs at once, on real engines: a tp=2 server, and two servers held together.

What these exercise beyond one GPU: the pool's placement (disjoint devices,
eviction of an idle server when short), ``CUDA_VISIBLE_DEVICES`` mapping of two
devices, per-device release waits, and ``stop_many`` of servers on different
GPUs at session end. On profiles with fewer than 2 GPUs they are skipped for
capacity, with the reason (ci/session/pytest_plugin.py). tp>1 servers get the
profile's ``tp_args`` (h200: eager mode, no custom all-reduce; ci/profiles/runners.py).
"""
from __future__ import annotations

import psutil
import pytest
import requests

from ci.host.gpu_telemetry import NvmlTelemetry
from ci.session.pool import ServerKey

# Bounds a completion on a ready server: a wedged engine, not a slow one.
REQUEST_TIMEOUT_S = 60.0


def _complete(server, prompt: str) -> str:
    r = requests.post(f"{server.base_url}/v1/completions", timeout=REQUEST_TIMEOUT_S,
                      json={"model": server.served_model, "prompt": prompt, "max_tokens": 8,
                            "temperature": 0})
    r.raise_for_status()
    body = r.json()
    assert body["usage"]["completion_tokens"] >= 1, body
    return body["choices"][0]["text"]


def _holders(server) -> dict[int, set[int]]:
    """Physical device -> the server's own processes NVML sees on it.

    Descendants of the API server by parentage (psutil), not by kiln's tag:
    vLLM's renamed workers erase their environment (MISSION.md).
    """
    root = psutil.Process(server.tree.pid)
    ours = {root.pid, *(p.pid for p in root.children(recursive=True))}
    with NvmlTelemetry() as nvml:
        return {dev: set(pids) & ours for dev, pids in nvml.pids(server.devices).items()}


@pytest.mark.model("default", tp=2)
def test_tp2_server_serves_from_two_gpus(server):
    assert len(server.devices) == 2 and len(set(server.devices)) == 2, server.devices
    _complete(server, "The capital of France is")
    holders = _holders(server)
    print(f"tp=2 on GPUs {list(server.devices)}: engine processes per GPU "
          f"{ {d: sorted(p) for d, p in holders.items()} }")
    assert all(holders[d] for d in server.devices), holders


@pytest.mark.gpus(2)
def test_two_servers_held_at_once_get_disjoint_gpus(kiln_pool, kiln_profile, request):
    # Two keys of the default model that differ only in a launch arg: two
    # servers, borrowed together, each on its own GPU.
    keys = [ServerKey(kiln_profile.default_model, 1, ("--max-num-seqs", n)) for n in ("8", "16")]
    held = []
    try:
        for key in keys:
            held.append(kiln_pool.acquire(key))
        first, second = held
        assert len(first.devices) == len(second.devices) == 1
        assert set(first.devices).isdisjoint(second.devices), (first.devices, second.devices)
        for srv in held:
            _complete(srv, f"Server {srv.key} says")
            holders = _holders(srv)
            assert holders[srv.devices[0]], (srv.key, holders)
        print(f"held together: {first.key} on GPU {first.devices[0]}, "
              f"{second.key} on GPU {second.devices[0]}")
    finally:
        for srv in held:
            kiln_pool.release(srv, request.node.nodeid)
