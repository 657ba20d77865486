"""Topology keys, markers, capacity, gateway readiness and teardown order, without processes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from ci.engine.backends import get_backend
from ci.engine.gateway import VLLM_ROUTER, Gateway, GatewayLaunch, get_gateway
from ci.engine.launch import ServerKey
from ci.engine.teardown import stop_in_order
from ci.engine.topology import TopologyKey, data_parallel_size, gpus_per_server, workers_of_label
from ci.kits import topology as kit
from ci.kits.client import KitFailure
from ci.profiles import runners
from ci.session import pytest_plugin, topologies
from ci.session.pool import topology_from_marker
from tests.fakes.openai_engine import fake_engine

TINY = ServerKey("tiny-llama")


def test_a_topology_key_names_gateway_policy_workers_and_server():
    key = TopologyKey(TINY, 2, "vllm-router", "round_robin")
    assert str(key) == "vllm-router:round_robin x2 tiny-llama|tp=1|"
    assert str(TopologyKey(TINY, 3)) == "dp x3 tiny-llama|tp=1|"
    # The policy defaults to the gateway's own, and says so.
    assert str(TopologyKey(TINY, 2, "vllm-router")).startswith("vllm-router:round_robin x2")
    assert TopologyKey(TINY, 2, "vllm-router") != TopologyKey(TINY, 2), "a gateway makes another unit"


@pytest.mark.parametrize("kwargs, cause", [
    ({"workers": 0}, "workers must be a positive int, got 0"),
    ({"workers": True}, "workers must be a positive int"),
    ({"workers": 2, "policy": "round_robin"}, "a policy or gateway_args needs a gateway"),
    ({"workers": 2, "gateway": "nginx"}, "unknown gateway 'nginx'; known: vllm-router"),
    ({"workers": 2, "gateway": "vllm-router", "policy": "fastest"}, "vllm-router has no policy 'fastest'"),
])
def test_a_bad_topology_is_one_line_naming_the_cause(kwargs, cause):
    with pytest.raises(ValueError, match=cause) as err:
        TopologyKey(TINY, **kwargs)
    assert "\n" not in str(err.value)


def test_gpus_are_workers_times_tp_times_data_parallel_ranks():
    assert TopologyKey(ServerKey("m", 2), 3, "vllm-router").gpus == 6
    assert gpus_per_server(ServerKey("m", 2, ("--data-parallel-size", "2"))) == 4
    assert data_parallel_size(["--max-num-seqs", "8"]) == 1
    assert data_parallel_size(["-dp", "4"]) == data_parallel_size(["--data-parallel-size=4"]) == 4
    assert data_parallel_size(["--dp-size", "2"]) == 2
    with pytest.raises(ValueError, match="--data-parallel-size needs a positive integer, got 'two'"):
        data_parallel_size(["--data-parallel-size", "two"])


def test_the_marker_reads_like_the_model_marker():
    key = topology_from_marker((), {"workers": 2, "gateway": "vllm-router", "policy": "round_robin",
                                    "args": "--max-num-seqs 8", "gateway_args": ["--log-level", "debug"]},
                               "tiny-llama")
    assert key == TopologyKey(ServerKey("tiny-llama", 1, ("--max-num-seqs", "8")), 2, "vllm-router",
                              "round_robin", ("--log-level", "debug"))
    assert topology_from_marker((), {"workers": 2, "model": "other", "tp": 2}, "tiny").server == ServerKey("other", 2)


@pytest.mark.parametrize("args, kwargs, cause", [
    ((2,), {}, "topology marker takes keywords only"),
    ((), {"gateway": "vllm-router"}, "say how many workers"),
    ((), {"workers": 2, "replicas": 3}, r"unknown keyword\(s\) \['replicas'\]"),
    ((), {"workers": 2, "tp": 0}, "tp must be a positive int"),
])
def test_a_bad_marker_is_one_line(args, kwargs, cause):
    with pytest.raises(ValueError, match=cause):
        topology_from_marker(args, kwargs, "tiny-llama")


def test_capacity_counts_every_worker():
    cpu, h100_4 = runners.get_profile("cpu"), runners.get_profile("h100-4")
    two = TopologyKey(TINY, 2, "vllm-router")
    assert topologies.capacity_skip_reason(two, cpu, 0) is None
    assert "runs 3 engines at once; the cpu profile runs at most 2" in topologies.capacity_skip_reason(
        TopologyKey(TINY, 3), cpu, 0)
    assert "needs 2 GPUs per worker; the cpu profile serves tp=1" in topologies.capacity_skip_reason(
        TopologyKey(ServerKey("m", 2), 2), cpu, 0)
    assert topologies.capacity_skip_reason(TopologyKey(ServerKey("m", 2), 2), h100_4, 4) is None
    reason = topologies.capacity_skip_reason(TopologyKey(ServerKey("m", 2), 3, "vllm-router"), h100_4, 4)
    assert reason.startswith("capacity:") and "needs 6 GPU(s) (3 workers x 2), 4 available" in reason


def _stub_worker(url: str):
    return SimpleNamespace(base_url=url, backend=get_backend("vllm-cpu"), model="/m", served_name="tiny-llama",
                           exit_code=lambda: None)


class _Resp:
    def __init__(self, status: int, body):
        self.status_code, self._body, self.text = status, body, str(body)

    def json(self):
        if isinstance(self._body, Exception):
            raise self._body
        return self._body


def test_the_gateway_is_ready_only_when_its_list_calls_every_worker_healthy(tmp_path):
    a, b = "http://127.0.0.1:1001", "http://127.0.0.1:1002"
    gw = Gateway(VLLM_ROUTER, [_stub_worker(a), _stub_worker(b)], log_dir=tmp_path, launch_timeout_s=10, key="gw")
    assert gw.served_model == "tiny-llama" and gw.backend.name == "vllm-router"
    assert gw.backend.health_path == "/workers" and gw.backend.accepts_ignore_eos, "the workers' API facts"

    def listed(*healthy):
        return {"workers": [{"url": u, "is_healthy": h} for u, h in zip((a, b), healthy)], "total": 2}

    assert gw._judge_health(_Resp(200, listed(True, True))) == (True, "all 2 workers healthy")
    ready, note = gw._judge_health(_Resp(200, listed(True, False)))
    assert not ready and note == f"1 of 2 workers healthy; not yet {b}"
    assert gw._judge_health(_Resp(200, {"workers": [{"url": a + "/", "is_healthy": True}]}))[0] is False
    assert gw._judge_health(_Resp(503, None)) == (False, "HTTP 503")
    ready, note = gw._judge_health(_Resp(200, ValueError("not json")))
    assert not ready and note.startswith("unreadable worker list")


def test_a_gateway_needs_workers_and_a_known_policy(tmp_path):
    with pytest.raises(ValueError, match="no workers to route to"):
        Gateway(VLLM_ROUTER, [], log_dir=tmp_path, launch_timeout_s=1, key="gw")
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        Gateway(VLLM_ROUTER, [_stub_worker("http://x")], policy="fastest", log_dir=tmp_path,
                launch_timeout_s=1, key="gw")
    assert get_gateway("vllm-router") is VLLM_ROUTER


def test_vllm_router_gets_its_own_metrics_port_and_fast_health_checks():
    argv = VLLM_ROUTER.argv(GatewayLaunch(30001, 30002, ("http://a", "http://b"), "round_robin",
                                          ("--log-level", "debug"), 240.0))
    assert argv[argv.index("--worker-urls") + 1:argv.index("--policy")] == ["http://a", "http://b"]
    assert argv[argv.index("--prometheus-port") + 1] == "30002", "never the shared default 29000"
    assert argv[argv.index("--health-check-interval-secs") + 1] == "1"
    assert argv[-2:] == ["--log-level", "debug"], "the test's gateway_args come last and win"



class _Stop:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def terminate(self):
        self.calls.append(self.name)

    def wait_memory(self):
        self.calls.append(f"memory {self.name}")


def test_gateways_stop_before_every_worker_and_a_shared_worker_stops_once():
    calls = []
    gw, w0, w1 = _Stop("gateway", calls), _Stop("w0", calls), _Stop("w1", calls)
    stop_in_order([gw], [w0, w1, w0])
    assert calls[0] == "gateway" and sorted(calls[1:3]) == ["w0", "w1"]
    assert calls.count("w0") == 1 and all(c.startswith("memory") for c in calls[3:])


def _item(marker_kwargs):
    mark = None if marker_kwargs is None else SimpleNamespace(kwargs=marker_kwargs)
    return SimpleNamespace(get_closest_marker=lambda name: mark if name == pytest_plugin.DISRUPTIVE else None)


def test_a_test_that_stops_the_whole_pool_runs_after_the_other_disruptive_ones():
    items = [_item({"pool": True}), _item({}), _item(None)]
    order = sorted(items, key=pytest_plugin._disruption)
    assert order == [items[2], items[1], items[0]]


def test_the_engines_own_data_parallel_ranks_each_serve():
    with fake_engine(ranks=2) as fake:
        assert kit.check_rank_spread(fake, 2) == {"0": 2, "1": 2}
    with fake_engine(ranks=2, bad_rank=1) as fake:
        with pytest.raises(KitFailure, match=r"rank\(s\) 1 of http://127.0.0.1:\d+ served none of 4 requests"):
            kit.check_rank_spread(fake, 2)
    with fake_engine() as fake:
        with pytest.raises(KitFailure, match=r"shows 1 rank\(s\) \(engine labels \['0'\]\).*launched with 2"):
            kit.check_rank_spread(fake, 2)


def test_a_server_running_its_own_data_parallelism_takes_a_slot_per_rank():
    from ci.session.pool import PoolError, ServerPool

    made = []

    def make(key, devices, label=None):
        made.append((key, devices))
        return SimpleNamespace(key=str(key), devices=devices, exit_code=lambda: None, record=None)

    pool = ServerPool(make, max_live=2, gpus=(0, 1, 2, 3))
    dp2 = ServerKey("m", 1, ("--data-parallel-size", "2"))
    pool._build(dp2)
    assert made == [(dp2, (0, 1))], "tp x dp GPUs for one server"
    with pytest.raises(PoolError, match=r"needs 4 engines at once; this pool runs at most 2"):
        pool._build(TopologyKey(dp2, 2))


def test_a_gateway_that_is_not_installed_fails_its_launch_in_one_line(tmp_path):
    import dataclasses

    from ci.engine.server import ServerError

    missing = dataclasses.replace(VLLM_ROUTER, module="kiln_no_such_gateway.launch")
    gw = Gateway(missing, [_stub_worker("http://127.0.0.1:1")], log_dir=tmp_path, launch_timeout_s=1, key="gw")
    with pytest.raises(ServerError) as err:
        gw.start()
    assert err.value.cause.startswith("gateway vllm-router is not installed in ")
    assert "requirements/e2e-cpu.txt pins it" in err.value.cause and "\n" not in err.value.cause
    assert not gw.launched()


@pytest.mark.parametrize("key", [
    TopologyKey(ServerKey("tiny-llama"), 2, "vllm-router", "round_robin"),
    TopologyKey(ServerKey("tiny-llama"), 2),
    TopologyKey(ServerKey("m", 2, ("--json", '{"a": [1]}')), 3, "vllm-router", None, ("--x", "a b")),
])
def test_a_topology_label_names_its_workers_key(key):
    # The durations store knows a topology test by this label; the shard packer groups it with its workers' key.
    assert workers_of_label(str(key)) == str(key.server)


def test_a_server_label_is_not_a_topology_label():
    assert workers_of_label(str(ServerKey("tiny-llama"))) is None
    assert workers_of_label("dp x0 m|tp=1|") is None
