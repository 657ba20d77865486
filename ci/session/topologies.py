"""pytest glue for topologies: the ``topology`` marker and fixture (issue 23).

Registered by ci/session/pytest_plugin.py. A test says what it needs::

    @pytest.mark.topology(workers=2, gateway="vllm-router", policy="round_robin")
    def test_spread(topology): ...              # requests go to topology.base_url

    @pytest.mark.topology(workers=2)             # data-parallel replicas, no gateway:
    def test_replicas(topology): ...             # the test balances over topology.workers

``model``, ``tp`` and ``args`` say what every worker serves (as the ``model``
marker does), ``gateway_args`` what the gateway gets besides kiln's own. The
pool launches each topology key once per run and lends it as one unit; the
report records each member (timeline, log tails) and the repro command of a
failure -- the test's node id -- re-creates the same topology from its marker.
"""
from __future__ import annotations

import pytest

from ci.engine.gateway import Gateway, get_gateway
from ci.engine.launch import ServerKey
from ci.engine.server import Server
from ci.engine.topology import Topology, TopologyKey, data_parallel_size, gateway_label
from ci.profiles import runners
from ci.session import waits
from ci.session.pool import GatewayFactory, ServerPool, topology_from_marker

MARKER = "topology"
_TOPOLOGY = pytest.StashKey[Topology]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "topology(workers, gateway=None, policy=None, model='default', tp=1, args=(), "
                   "gateway_args=()): N workers of one key as one unit, behind a gateway when named "
                   "(none: data-parallel replicas the test balances)")


def topology_key(item: pytest.Item, profile: runners.Profile) -> TopologyKey | None:
    """The topology ``item``'s marker asks for; None without one; a bad marker is a UsageError."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    try:
        return topology_from_marker(marker.args, marker.kwargs, profile.default_model)
    except ValueError as exc:
        raise pytest.UsageError(f"{item.nodeid}: {exc}") from None


def worker_key(item: pytest.Item, profile: runners.Profile) -> ServerKey | None:
    """What each worker of ``item``'s topology serves (warmup warms it like any server key)."""
    key = topology_key(item, profile)
    return key.server if key is not None else None


def capacity_skip_reason(key: TopologyKey, profile: runners.Profile, available: int) -> str | None:
    """Why a topology cannot run on this machine (GPUs = workers x tp, engines at once), or None."""
    if profile.vendor == "cpu":
        if key.server.tp > 1:
            return (f"capacity: topology {key} needs {key.server.tp} GPUs per worker; "
                    f"the cpu profile serves tp=1")
        engines = key.workers * data_parallel_size(key.server.args)
        if engines > profile.max_live_servers:
            return (f"capacity: topology {key} runs {engines} engines at once; the {profile.name} "
                    f"profile runs at most {profile.max_live_servers}")
        return None
    if key.gpus > available:
        return (f"capacity: topology {key} needs {key.gpus} GPU(s) ({key.workers} workers x "
                f"{key.gpus // key.workers}), {available} available on this runner")
    return None


def gateway_factory(profile: runners.Profile, log_dir) -> GatewayFactory:
    """How the pool builds a topology's gateway: in front of its workers, the profile's launch deadline."""
    def make(key: TopologyKey, workers: list[Server]) -> Gateway:
        return Gateway(get_gateway(key.gateway), workers, policy=key.policy, args=key.gateway_args,
                       log_dir=log_dir, launch_timeout_s=profile.launch_timeout_s, key=gateway_label(key))

    return make


@pytest.fixture
def topology(request: pytest.FixtureRequest, kiln_pool: ServerPool, kiln_profile: runners.Profile,
             record_property, record_testsuite_property) -> Topology:
    """A ready topology for this test's ``topology`` marker, borrowed from the session pool."""
    key = topology_key(request.node, kiln_profile)
    if key is None:
        raise pytest.UsageError(f"{request.node.nodeid}: the topology fixture needs a "
                                f"@pytest.mark.topology(workers=N, ...) marker")
    unit = waits.acquire(request.config, kiln_pool, key, record_property)
    version = unit.workers[0].backend.version()
    if version:
        record_testsuite_property("kiln_engine_version", f"{unit.workers[0].backend.name} {version}")
    request.node.stash[_TOPOLOGY] = unit
    try:
        yield unit
    finally:
        kiln_pool.release(unit, request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    unit = item.stash.get(_TOPOLOGY, None)
    if unit is not None and report.failed:
        # Every member's last words beside the failure: which one broke is the question.
        for srv in unit.members():
            if srv.launched():
                report.sections.append((f"kiln {srv.key} — last {srv.tail_lines} log lines", srv.log_tail()))
    return report
