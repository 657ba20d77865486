"""What a test waited for its servers, in its JUnit: the prelaunch booked on the first borrower, each
launch once on the test that waited for it, and the durations store reading both back.

The engines here launch without a process (their records say how long the launch took), so the pool,
the fixtures and the plugin run as they do in e2e while nothing is started.
"""
from __future__ import annotations

import threading
import textwrap
from types import SimpleNamespace

import pytest

from ci.engine import launch
from ci.engine import topology as topology_mod
from ci.engine.server import ServerExited, ServerRecord
from ci.engine.topology import TopologyKey
from ci.report import durations, flakes
from ci.session import pool as pool_mod
from ci.session import waits
from ci.session.pool import ServerKey, ServerPool

pytest_plugins = ["pytester"]

# How long each fake model's launch took, launch to ready (what its record says).
LAUNCH_S = {"a": 20.0, "b": 56.0, "c": 18.0}
# In the plugin run: how long a fake launch really blocks, so the first borrower's wait is seen.
HOLD_S = 0.05


class FakeEngine:
    """A server whose start stamps its record as a launch of LAUNCH_S[model] would; model "broken" fails."""

    def __init__(self, key: ServerKey, devices: tuple[int, ...] = (), hold_s: float = 0.0):
        self.key, self.model, self.devices, self.memory, self.hold_s = str(key), key.model, devices, None, hold_s
        self.record = ServerRecord(str(key), key.model, key.tp, list(devices), log_path="")
        self.base_url = f"http://{key.model}.invalid"
        self.backend = SimpleNamespace(name="fake", version=lambda: "")

    def start(self) -> FakeEngine:
        if self.model == "broken":
            raise ServerExited("engine exited with code 3 before it was ready")
        threading.Event().wait(self.hold_s)  # the launch's own time, when the test needs one
        self.record.launched = 1000.0
        self.record.ready = 1000.0 + LAUNCH_S[self.model]
        return self

    def exit_code(self) -> None:
        return None

    def terminate(self) -> None:
        self.record.stopped = self.record.ready

    def wait_memory(self) -> None:
        pass

    def note_test(self, nodeid: str) -> None:
        self.record.tests.append(nodeid)

    def record_dict(self) -> dict:
        return self.record.to_dict()


@pytest.fixture
def no_processes(monkeypatch):
    """The pool and topologies start engines by calling their own start (no process, no crash watch)."""
    monkeypatch.setattr(pool_mod, "start_watched", lambda server: server.start())
    monkeypatch.setattr(topology_mod, "start_watched", lambda server: server.start())


def test_the_first_borrower_books_the_prelaunch_and_each_launch_is_booked_once(monkeypatch, no_processes):
    # waits' clock: prelaunch 0 -> 56.5, then each borrow's start and end.
    clock = iter([0.0, 56.5, 100.0, 100.25, 200.0, 200.0, 300.0, 319.0, 400.0, 457.0, 500.0, 500.5])
    monkeypatch.setattr(waits, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    pool = ServerPool(lambda key, devices, label=None: FakeEngine(key, devices), max_live=2)
    config = SimpleNamespace(stash=pytest.Stash())
    a, b, c = ServerKey("a"), ServerKey("b"), ServerKey("c")
    assert waits.prelaunch(config, pool, [a, b, a, c]) == [a, b]  # two engine slots: c launches on borrow

    def borrow(key: ServerKey | TopologyKey) -> list[tuple[str, str]]:
        props: list[tuple[str, str]] = []
        pool.release(waits.acquire(config, pool, key, lambda name, value: props.append((name, value))))
        return props

    # The first test waited for the prelaunch of both servers and its own borrow.
    assert borrow(a) == [("kiln_server", "a|tp=1|"), ("kiln_server_wait_s", "56.750"),
                         ("kiln_launch", "a|tp=1|=20.000"), ("kiln_launch", "b|tp=1|=56.000")]
    # The real-model test borrows what was prelaunched: no wait, no launch booked twice.
    assert borrow(b) == [("kiln_server", "b|tp=1|"), ("kiln_server_wait_s", "0.000")]
    # A server launched at its borrow is booked on the test that borrowed it.
    assert borrow(c) == [("kiln_server", "c|tp=1|"), ("kiln_server_wait_s", "19.000"),
                         ("kiln_launch", "c|tp=1|=18.000")]
    # A topology of two b workers adopts the idle b and launches one more: that launch is booked, under
    # the workers' key (the family the packer groups a topology's tests in).
    assert borrow(TopologyKey(b, 2)) == [("kiln_server", "dp x2 b|tp=1|"), ("kiln_server_wait_s", "57.000"),
                                         ("kiln_launch", "b|tp=1|=56.000")]
    # A failed launch books its wait (the test is not timed anyway) and no launch.
    props: list[tuple[str, str]] = []
    with pytest.raises(ServerExited):
        waits.acquire(config, pool, ServerKey("broken"), lambda name, value: props.append((name, value)))
    assert props == [("kiln_server", "broken|tp=1|"), ("kiln_server_wait_s", "0.500")]
    assert pool.take_launches() == [] and pool.launches == 5


CHILD = textwrap.dedent('''
    import pytest

    @pytest.mark.model("a")
    def test_first(server):
        pass

    @pytest.mark.model("a")
    def test_again(server):
        pass

    @pytest.mark.model("b")
    def test_real_model(server):
        pass

    @pytest.mark.model("c")
    def test_third_key(server):
        pass
''')


def test_the_plugin_writes_the_wait_and_the_launches_and_the_store_reads_them(pytester, monkeypatch, no_processes):
    monkeypatch.setattr(launch, "build_server", lambda profile, backend, key, **kw: FakeEngine(
        key, kw.get("devices", ()), hold_s=HOLD_S))
    pytester.makepyfile(test_child=CHILD)
    reports = pytester.path / "reports"
    result = pytester.runpytest_inprocess("-p", "ci.session.pytest_plugin", "-p", "no:cacheprovider",
                                          "--kiln-profile=cpu", f"--kiln-reports={reports}",
                                          f"--junitxml={reports / 'junit-e2e-cpu.xml'}")
    result.assert_outcomes(passed=4)
    (run,) = flakes.read_history(reports)
    props = {c.nodeid.rpartition("::")[2]: c.properties for c in run.result.cases}
    waited = {name: float(dict(p)[durations.WAIT_PROPERTY]) for name, p in props.items()}
    booked = {name: [v for k, v in p if k == durations.LAUNCH_PROPERTY] for name, p in props.items()}
    # The cpu lane prelaunches a and b (two engine slots) in the first test's setup; c launches at its borrow.
    assert booked == {"test_first": ["a|tp=1|=20.000", "b|tp=1|=56.000"], "test_again": [],
                      "test_real_model": [], "test_third_key": ["c|tp=1|=18.000"]}
    # The two prelaunched engines start side by side: the first test waited one launch's time, the next none.
    assert waited["test_first"] >= HOLD_S > waited["test_again"] + waited["test_real_model"]
    assert waited["test_third_key"] >= HOLD_S
    store = durations.Store()
    store.ingest([run])
    known = store.estimates("cpu")
    assert known.launches == {"a|tp=1|": 20.0, "b|tp=1|": 56.0, "c|tp=1|": 18.0}
    first = next(c for c in run.result.cases if c.nodeid.endswith("::test_first"))
    assert known.p90[first.nodeid] == pytest.approx(first.duration - waited["test_first"], abs=1e-3)
