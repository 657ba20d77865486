"""Topologies with real processes: the real vllm-router in front of fake engines.

The gateway is the real wheel's binary (requirements/tests.txt); the workers
are kiln's fault engine or the fake OpenAI engine run as processes of their
own, under the supervisor like any engine. What is checked costs seconds
here and minutes with real engines: launch order and readiness, a dying
worker named with its log tail, gateway-first teardown with one memory
wait, the topology kits passing and failing, and a SIGKILLed harness
leaving nothing that a scan by name can find.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ci.engine.backends import generic
from ci.engine.backends.spec import python
from ci.engine.gateway import PROCESS_NAMES, VLLM_ROUTER, Gateway
from ci.engine.launch import ServerKey
from ci.engine.server import Server, ServerExited
from ci.engine.topology import Topology, TopologyError, TopologyKey, gateway_label, worker_label
from ci.host import procfs, procs
from ci.kits import topology as kit
from ci.kits.client import KitFailure
from ci.session.pool import ServerPool
from tests import requires
from tests.fakes.openai_engine import FAKE_BACKEND

ROOT = Path(__file__).resolve().parents[2]
FAULT_ENGINE = ROOT / "tests" / "fakes" / "fault_engine.py"
KEY = TopologyKey(ServerKey("fake-model"), 2, "vllm-router", "round_robin")
# Fake engines are up in well under a second and the router in ~1.5 s; these
# bound a hung one without waiting long.
WORKER_LAUNCH_S = 10.0
GATEWAY_LAUNCH_S = 30.0
# The bound for "the harness died, the topology is gone".
HARNESS_GONE_S = 5.0
CHILD_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _router_installed():
    if not VLLM_ROUTER.installed():
        requires.missing("vllm-router is not installed (requirements/tests.txt pins it)")


def _fault(tmp_path: Path, i: int, mode: str = "ok", ready_after: float = 0.0, key: TopologyKey = KEY) -> Server:
    cmd = f"{{python}} {shlex.quote(str(FAULT_ENGINE))} --port {{port}} --mode {mode} --ready-after {ready_after}"
    return Server(generic(cmd), "m", log_dir=tmp_path, launch_timeout_s=WORKER_LAUNCH_S, grace_s=1,
                  key=worker_label(key, i))


# The fake OpenAI engine as a process: completions, chat, streams and a
# request counter, which the topology kits need.
FAKE_PROCESS = dataclasses.replace(
    FAKE_BACKEND, argv=lambda model, port, tp, args: [python(), "-m", "tests.fakes.openai_engine",
                                                      "--port", str(port), *args])


def _fake(tmp_path: Path, i: int, key: TopologyKey = KEY, **knobs) -> Server:
    args = ("--knobs", json.dumps(knobs)) if knobs else ()
    return Server(FAKE_PROCESS, "fake-model", args=args, env={"PYTHONPATH": str(ROOT)}, log_dir=tmp_path,
                  launch_timeout_s=WORKER_LAUNCH_S, grace_s=1, key=worker_label(key, i))


def _gateway(tmp_path: Path, workers, key: TopologyKey = KEY, args=()) -> Gateway:
    return Gateway(VLLM_ROUTER, workers, policy=key.policy, args=args, log_dir=tmp_path,
                   launch_timeout_s=GATEWAY_LAUNCH_S, key=gateway_label(key))


def _topology(tmp_path: Path, workers, key: TopologyKey = KEY, gateway_args=()) -> Topology:
    return Topology(key, workers, _gateway(tmp_path, workers, key, gateway_args))


def _gone(servers) -> bool:
    return all(procs.tagged(s.tree.tag) == [] and not s.tree.member_pids() for s in servers if s.tree)


def test_workers_first_then_a_gateway_ready_when_it_lists_them_all_healthy(tmp_path):
    topo = _topology(tmp_path, [_fault(tmp_path, 0), _fault(tmp_path, 1)])
    try:
        topo.start()
        gw = topo.gateway
        # Every worker answered its own health check before the gateway was launched.
        assert all(w.record.ready <= gw.record.launched for w in topo.workers)
        health = kit.gateway_health(gw)
        assert health == {w.base_url: True for w in topo.workers}
        assert gw.command[gw.command.index("--worker-urls") + 1:][:2] == [w.base_url for w in topo.workers]
        # Its process is what the leak scan looks for: renamed by setproctitle.
        assert any(n in procfs.label(gw.tree.pid) for n in PROCESS_NAMES), procfs.label(gw.tree.pid)
    finally:
        topo.stop()
    assert _gone(topo.members())


def test_a_worker_that_dies_fails_the_launch_naming_it_and_calls_the_others_off(tmp_path):
    # Worker 0 would take 30 s to load; worker 1 crashes at once. The launch must
    # not wait out worker 0: the first failure calls it off.
    topo = _topology(tmp_path, [_fault(tmp_path, 0, ready_after=30), _fault(tmp_path, 1, mode="crash")])
    t0 = time.monotonic()
    with pytest.raises(TopologyError) as err:
        topo.start()
    assert time.monotonic() - t0 < 10
    assert err.value.cause.startswith(f"{worker_label(KEY, 1)} failed to launch: ")
    assert "exited with code 3" in err.value.cause
    assert "injected crash" in err.value.tail  # its log tail, not worker 0's
    assert not topo.gateway.launched(), "no gateway in front of a broken set of workers"
    assert _gone(topo.workers)


def test_a_worker_that_dies_while_the_gateway_waits_is_named(tmp_path):
    workers = [_fault(tmp_path, 0).start(), _fault(tmp_path, 1).start()]
    gw = _gateway(tmp_path, workers)
    try:
        for pid in workers[1].tree.member_pids():
            os.kill(pid, signal.SIGKILL)  # members of our own tree only
        with pytest.raises(ServerExited) as err:
            gw.start()
        assert err.value.cause.startswith(f"worker 1 ({worker_label(KEY, 1)}, {workers[1].base_url}) exited")
        assert "fault engine pid" in err.value.tail
    finally:
        Topology(KEY, workers, gw).stop()
    assert _gone([gw, *workers])


class _Guard:
    """A device-memory guard that records its calls (no GPU here)."""

    def __init__(self):
        self.launched, self.waits = [], []

    def before_launch(self, devices):
        self.launched.append(tuple(devices))

    def wait_released(self, devices, owner=""):
        self.waits.append((tuple(devices), owner))


def test_one_teardown_gateway_first_then_every_worker_with_one_memory_wait(tmp_path):
    guard = _Guard()
    workers = [_fault(tmp_path, i) for i in range(2)]
    for i, w in enumerate(workers):
        w.devices, w.memory = (i,), guard
    topo = _topology(tmp_path, workers)
    topo.start()
    topo.stop()
    gw = topo.gateway
    assert gw.record.stopped <= min(w.record.stopped - w.record.stop_seconds for w in workers) + 0.05
    assert guard.waits == [((0, 1), f"{workers[0].key}, {workers[1].key}")], "one wait for all devices"
    assert all(s.record.memory_free for s in topo.members())
    assert _gone(topo.members())


def test_kits_pass_through_a_real_gateway(tmp_path):
    topo = _topology(tmp_path, [_fake(tmp_path, 0), _fake(tmp_path, 1)])
    try:
        topo.start()
        spread = kit.check_spread(topo.gateway, topo.workers)
        assert spread.per_worker == (2, 2), spread
        kit.check_same_answers(topo.gateway, topo.workers[0], repeat=2)
        # The data-parallel form: the kit is the load balancer.
        assert kit.check_spread(None, topo.workers).per_worker == (2, 2)
        kit.check_same_answers(topo.workers[1], topo.workers[0])
    finally:
        topo.stop()


def test_spread_fails_naming_a_worker_the_gateway_never_uses(tmp_path):
    workers = [_fake(tmp_path, 0).start(), _fake(tmp_path, 1).start()]
    gw = _gateway(tmp_path, workers[:1])  # routes to worker 0 only
    try:
        gw.start()
        with pytest.raises(KitFailure, match=rf"worker 1 \({workers[1].base_url}\) served none of 4"):
            kit.check_spread(gw, workers)
    finally:
        Topology(KEY, workers, gw).stop()


def test_same_answers_fail_when_one_worker_decodes_differently(tmp_path):
    topo = _topology(tmp_path, [_fake(tmp_path, 0), _fake(tmp_path, 1, diverge_at=3)])
    try:
        topo.start()
        with pytest.raises(KitFailure, match=r"differs from .* at character"):
            kit.check_same_answers(topo.gateway, topo.workers[0], repeat=2)
    finally:
        topo.stop()


def _kill(server: Server):
    def kill() -> None:
        for pid in server.tree.member_pids():
            os.kill(pid, signal.SIGKILL)  # members of our own tree only
    return kill


def test_a_killed_worker_is_taken_out_and_requests_keep_succeeding(tmp_path):
    topo = _topology(tmp_path, [_fake(tmp_path, 0), _fake(tmp_path, 1)])
    try:
        topo.start()
        out = kit.check_killed_worker_taken_out(topo.gateway, topo.workers, 1, _kill(topo.workers[1]))
        assert out.succeeded == kit.AFTER_KILL_REQUESTS and out.taken_out_s < kit.TAKEN_OUT_DEADLINE_S
        print(f"taken out after {out.taken_out_s:.1f} s")
    finally:
        topo.stop()
    assert _gone(topo.members())


def test_a_gateway_that_keeps_a_dead_worker_fails_naming_it(tmp_path):
    # The router's own default: one health check a minute. Requests still
    # succeed (it retries on the other worker), but the dead one stays listed.
    topo = _topology(tmp_path, [_fake(tmp_path, 0), _fake(tmp_path, 1)],
                     gateway_args=("--health-check-interval-secs", "60"))
    try:
        topo.start()
        url = topo.workers[1].base_url
        with pytest.raises(KitFailure, match=rf"still calls the killed worker 1 \({url}\) healthy"):
            kit.check_killed_worker_taken_out(topo.gateway, topo.workers, 1, _kill(topo.workers[1]),
                                              deadline_s=3.0)
    finally:
        topo.stop()


def test_a_gateway_that_routes_to_a_dead_worker_fails_naming_it(tmp_path):
    topo = _topology(tmp_path, [_fake(tmp_path, 0), _fake(tmp_path, 1)],
                     gateway_args=("--disable-retries", "--health-check-interval-secs", "60"))
    try:
        topo.start()
        url = topo.workers[1].base_url
        with pytest.raises(KitFailure, match=rf"kept routing to the killed worker 1 \({url}\)"):
            kit.check_killed_worker_taken_out(topo.gateway, topo.workers, 1, _kill(topo.workers[1]))
    finally:
        topo.stop()


# -- the pool: one unit, one key, reused; a live engine lent as a worker ----------------
def _pool(tmp_path: Path, max_live: int = 2) -> ServerPool:
    def make(key: ServerKey, devices, label=None) -> Server:
        return Server(FAKE_PROCESS, key.model, env={"PYTHONPATH": str(ROOT)}, log_dir=tmp_path,
                      launch_timeout_s=WORKER_LAUNCH_S, grace_s=1, key=label or str(key), devices=devices)

    def gateway(key: TopologyKey, workers) -> Gateway:
        return _gateway(tmp_path, workers, key)

    return ServerPool(make, max_live=max_live, gateway_factory=gateway)


def test_the_pool_lends_a_topology_as_one_unit_and_reuses_live_engines(tmp_path):
    pool = _pool(tmp_path)
    single = ServerKey("fake-model")
    try:
        plain = pool.acquire(single)
        pool.release(plain, "t::single")
        topo = pool.acquire(KEY)
        # The idle server of the same key is worker 0: one more engine, not two.
        assert topo.workers[0] is plain and pool.launches == 2
        assert plain.record.roles == [worker_label(KEY, 0)]
        pool.release(topo, "t::gateway")
        assert pool.acquire(KEY) is topo  # reused, not relaunched
        pool.release(topo, "t::again")
        dp = pool.acquire(TopologyKey(single, 2))  # the data-parallel form: both engines lent again
        assert dp.workers == topo.workers and dp.gateway is None and pool.launches == 2
        pool.release(dp, "t::dp")
        assert topo.gateway.record.tests == ["t::gateway", "t::again"]
    finally:
        pool.close()
    servers = pool.servers()
    assert len(servers) == 3 and _gone(servers)
    # Gateway first, then the engines (together): none stopped before it.
    assert topo.gateway.record.stopped <= min(w.record.stopped for w in topo.workers)


def test_a_topology_bigger_than_the_pool_is_refused_in_one_line(tmp_path):
    pool = _pool(tmp_path, max_live=2)
    with pytest.raises(Exception, match=r"needs 3 engines at once; this pool runs at most 2"):
        pool.acquire(TopologyKey(ServerKey("fake-model"), 3, "vllm-router"))
    assert pool.launches == 0


# -- a harness SIGKILLed with a live topology ---------------------------------------
HARNESS = textwrap.dedent("""
    import json, sys, threading
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from tests.integration import test_topology as t
    tmp = Path(sys.argv[2])
    topo = t._topology(tmp, [t._fake(tmp, 0), t._fake(tmp, 1)]).start()
    print(json.dumps([s.tree.pid for s in topo.members()]), flush=True)
    threading.Event().wait()
""")


def left_behind(names, before: set, tree: set) -> list:
    """Processes matching ``names`` (by name or command line) that were not there ``before`` and
    are this harness's: in its ``tree`` as the process table showed it, or orphans whose every
    ancestor up to init matches too. Another job's new engine hangs below its own live harness."""
    found = [st for st in procfs.matching(names) if st.identity not in before]
    matched = {st.pid for st in found}
    return [st for st in found if st.identity in tree or all(p in matched for p in procfs.ancestors(st.pid))]


def test_a_sigkilled_harness_leaves_no_gateway_and_no_worker(tmp_path):
    names = (*PROCESS_NAMES, "tests.fakes.openai_engine")
    before = {st.identity for st in procfs.matching(names)}
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    harness = subprocess.Popen([sys.executable, str(script), str(ROOT), str(tmp_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        roots = json.loads(harness.stdout.readline())
    finally:
        tree = {st.identity for st in procfs.descendants(harness.pid)}
        harness.kill()  # our own child: a CI cancel or an OOM kill of the harness
        harness.wait()
    assert len(roots) == 3 and len(tree) >= 6, "gateway + 2 workers, each under its supervisor"
    t0 = time.monotonic()
    while any(procfs.is_alive(i) for i in tree) and time.monotonic() - t0 < CHILD_TIMEOUT_S:
        time.sleep(procs.POLL_INTERVAL_S)  # bounded poll on the condition above
    gone_s = time.monotonic() - t0
    left = [procfs.label(st.pid) for st in left_behind(names, before, tree)]
    print(f"harness SIGKILL -> {len(tree)} processes (gateway, workers, supervisors) gone in {gone_s:.2f} s")
    assert left == [], f"left after the harness died: {left}"
    assert gone_s <= HARNESS_GONE_S


# -- the plugin: marker, fixture, records, report and repro -----------------------------
CHILD_FILE = textwrap.dedent('''
    import pytest

    @pytest.mark.topology(workers=2, gateway="vllm-router", policy="round_robin", model="fake-model")
    def test_through(topology):
        assert topology.gateway is not None and len(topology.workers) == 2

    @pytest.mark.topology(workers=2, gateway="vllm-router", policy="round_robin", model="fake-model")
    def test_fail(topology):
        assert False, "planned failure"
''')


def _run_child(tmp_path: Path, *select: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_child.py").write_text(CHILD_FILE)
    backend = "generic:{python} -m tests.fakes.openai_engine --port {port}"
    argv = [sys.executable, "-m", "pytest", *(select or [str(tmp_path / "test_child.py")]),
            "-p", "ci.session.pytest_plugin", "-p", "no:cacheprovider", f"--rootdir={tmp_path}",
            "--kiln-profile=cpu", f"--kiln-backend={backend}", f"--kiln-reports={tmp_path / 'reports'}",
            f"--junitxml={tmp_path / 'junit.xml'}"]
    return subprocess.run(argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                   "KILN_CACHE_DIR": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def test_the_plugin_records_every_member_and_the_repro_recreates_the_topology(tmp_path):
    from ci.report.render import build_report, load_servers

    run = _run_child(tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 1 and "1 failed, 1 passed" in out, out
    # The failure carries every member's log tail, each under its own name.
    for name in (gateway_label(KEY), worker_label(KEY, 0), worker_label(KEY, 1)):
        assert f"kiln {name} — last" in out, name
    records, _ = load_servers(tmp_path / "reports" / "servers-e2e-cpu.json")
    assert sorted(r.key for r in records) == sorted([gateway_label(KEY), worker_label(KEY, 0),
                                                     worker_label(KEY, 1)])
    assert all(r.ready and r.stopped and len(r.tests) == 2 for r in records), "one unit, launched once"
    report = build_report(tmp_path / "junit.xml", "e2e-cpu", root=tmp_path,
                          servers_path=tmp_path / "reports" / "servers-e2e-cpu.json")
    # The timeline has a section per process of the topology.
    assert report.count("    section ") == 3, report
    for role in ("gateway of vllm-router round", "worker 0 of vllm-router round", "worker 1 of vllm-router round"):
        assert f"section {role}" in report, report
    assert "nox -s e2e-cpu -- 'test_child.py::test_fail'" in report, report
    junit = (tmp_path / "junit.xml").read_text()
    assert f'name="kiln_server" value="{KEY}"' in junit
    # The repro command selects the node id alone: that builds the same topology again.
    again = _run_child(tmp_path, str(tmp_path / "test_child.py") + "::test_fail")
    assert "1 failed" in again.stdout, again.stdout
    assert f'name="kiln_server" value="{KEY}"' in (tmp_path / "junit.xml").read_text()
    records, _ = load_servers(tmp_path / "reports" / "servers-e2e-cpu.json")
    assert sorted(r.key for r in records) == sorted([gateway_label(KEY), worker_label(KEY, 0),
                                                     worker_label(KEY, 1)])
