"""pytest glue for e2e suites: the ``model`` marker, the ``server`` fixture and the pool.

Loaded for every pytest run (``-p ci.session.pytest_plugin`` in pyproject.toml). A test says what it needs::

    @pytest.mark.model("tiny-llama", tp=1, args=["--max-num-seqs", "8"])
    def test_chat(server): ...

and borrows the one server for that key; the pool launches each key once per
run and stops everything with ``stop_many`` at session end. The fixture is
function-scoped with try/finally, because class-scoped teardown never ran
under pytest-parallel and leaked pool references (sglang #24222).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from pathlib import Path

import pytest

from ci.engine import launch, models
from ci.engine.backends import BackendSpec, get_backend
from ci.engine.launch import ServerKey
from ci.engine.server import Server
from ci.engine.topology import gpus_per_server
from ci.host import alloc, cachedir, gpu, gpu_smi, gpumem, procfs, reaper
from ci.profiles import runners
from ci.report import artefacts, quarantine
from ci.session import known_issues, leakscan, outcomes, skips, topologies, waits
from ci.session.pool import ServerPool, key_from_marker
from ci.text import envflag
from ci.warmup import markers as warmup_markers
from ci.warmup.specs import WarmupSpec

log = logging.getLogger(__name__)

PROFILE_ENV = "KILN_PROFILE"
SESSION_ENV = "KILN_SESSION"
REPORTS_DIR_ENV = "KILN_REPORTS_DIR"
_POOL_KEY = pytest.StashKey[ServerPool]()
_PREV_SIGTERM = pytest.StashKey[object]()
_DISCOVERY = pytest.StashKey[gpu.Discovery]()
_SERVER = pytest.StashKey[Server]()
_BASELINE = pytest.StashKey[set]()
_TALLY = pytest.StashKey[skips.Tally]()
TALLY_PLUGIN = "kiln-skip-tally"
DISRUPTIVE = "kiln_disruptive"
# Set at collection on a test whose prerequisite this runner lacks, under CI: it fails at setup.
MISSING = "kiln_missing"
# A test whose server must honour a request's seed (SGLang needs a launch flag for it).
SEEDED = "kiln_seeded"
TOPOLOGY_PLUGIN = "kiln-topologies"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kiln")
    group.addoption("--kiln-profile", default=os.environ.get(PROFILE_ENV, "cpu"),
                    help="runner profile from ci/profiles/runners.py (default: $KILN_PROFILE or cpu)")
    group.addoption("--kiln-model", default=models.from_env(), metavar="NAME_OR_PATH",
                    help="serve this model wherever a test asks for the profile's default: a hub "
                         "id, a local model directory or one of kiln's local models "
                         f"({', '.join(models.LOCAL_MODELS)}) (default: ${models.MODEL_ENV})")
    group.addoption("--kiln-backend", default=None,
                    help="override the profile's backend (e.g. generic:<template>)")
    group.addoption("--kiln-reports", default=os.environ.get(REPORTS_DIR_ENV, "reports"),
                    help="where server logs and server records go")
    group.addoption(known_issues.STRICT_OPTION, action="store_true", default=False,
                    help="run known_issue tests on their profiles as strict xfail, so a stale "
                         "marker (the test passes now) fails the run")
    group.addoption("--kiln-collect-keys", default=None, metavar="PATH",
                    help="write the server keys the collected tests need to PATH (JSON) — "
                         "warmup reads the same declarations the tests use")
    group.addoption("--kiln-quarantine", default=None, metavar="PATH",
                    help="quarantined tests (run, reported, not failing the job); default "
                         f"${quarantine.PATH_ENV} or tests/quarantine.json (invoke flakes writes it)")
    outcomes.add_options(group)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "model(name='default', tp=1, args=()): the server a test needs")
    config.addinivalue_line("markers", "gpus(n): GPUs a test needs beyond its model's tp")
    config.addinivalue_line("markers", f"{SEEDED}: its server honours a request's seed (the backend's "
                                       f"seed_flag added to its model's launch args)")
    config.addinivalue_line("markers", f"{MISSING}(reason): set by kiln; fails the test at setup")
    config.addinivalue_line("markers", "known_issue(profiles, reason, link=None): skip on those profiles")
    config.addinivalue_line("markers", f"{DISRUPTIVE}(pool=False): leaves its server unusable (stops or "
                                       f"kills it); runs after every other test; pool=True (it stops the "
                                       f"whole pool) after those too")
    if not config.pluginmanager.has_plugin(TOPOLOGY_PLUGIN):
        # The topology marker and fixture (pytest replays pytest_configure for it).
        config.pluginmanager.register(topologies, TOPOLOGY_PLUGIN)
    # Every failure typed infra / engine / test from its evidence; infra ones retried on a fresh server.
    config.pluginmanager.register(outcomes.OutcomeHooks(
        outcomes.retries_from(config), fresh=lambda item: _fresh_server(item),
        servers=lambda: pool.servers() if (pool := config.stash.get(_POOL_KEY, None)) else [],
        profile=config.getoption("--kiln-profile")), outcomes.PLUGIN_NAME)


def _fresh_server(item: pytest.Item) -> None:
    """Before an infra retry: the test's key launches anew (its server, or failed launch, forgotten)."""
    pool = item.config.stash.get(_POOL_KEY, None)
    if pool is not None and _wants_engine(item):
        pool.forget(server_key(item, profile_of(item.config)))


def profile_of(config: pytest.Config) -> runners.Profile:
    """The run's profile, its default model replaced by ``--kiln-model`` when given."""
    profile = runners.get_profile(config.getoption("--kiln-profile"))
    model = config.getoption("--kiln-model", None)
    if not model:
        return profile
    try:
        models.check(model)
    except models.ModelError as exc:
        raise pytest.UsageError(f"kiln: {exc}") from None
    return dataclasses.replace(profile, default_model=model)


def session_name(config: pytest.Config) -> str:
    return os.environ.get(SESSION_ENV) or profile_of(config).session


def backend_of(config: pytest.Config) -> BackendSpec:
    """The run's engine spec: ``--kiln-backend`` when given, else the profile's."""
    return get_backend(config.getoption("--kiln-backend") or profile_of(config).backend)


def log_dir_of(config: pytest.Config) -> Path:
    """Where this session's server (and gateway) logs go."""
    return Path(config.getoption("--kiln-reports")) / "logs" / session_name(config)


def _factory(config: pytest.Config, memory: gpumem.DeviceMemoryGuard | None):
    profile = profile_of(config)
    backend = backend_of(config)
    log_dir = log_dir_of(config)

    def make(key: ServerKey, devices: tuple[int, ...], label: str | None = None) -> Server:
        # A launch that relies on caches `invoke warmup` filled: if it fails,
        # the report suggests `invoke warmup --cold` (a poisoned cache).
        spec = WarmupSpec(model=key.model, tp=key.tp, args=key.args, backend=backend.name)
        warm = warmup_markers.marker_path(cachedir.default_root(), spec).exists()
        return launch.build_server(profile, backend, key, log_dir=log_dir, devices=devices,
                                   memory=memory, warm_dependent=warm, label=label)

    return make


def _discovery(config: pytest.Config) -> gpu.Discovery | None:
    """GPU discovery for this run, once; None on CPU profiles (no GPU is used there)."""
    if profile_of(config).vendor == "cpu":
        return None
    found = config.stash.get(_DISCOVERY, None)
    if found is None:
        try:
            found = gpu.discover()
        except gpu.GpuDiscoveryError as exc:
            # Never "0 GPUs, everything skipped, green": a broken tool is an error.
            raise pytest.UsageError(f"kiln: GPU discovery failed: {exc}") from None
        config.stash[_DISCOVERY] = found
    return found


def gpu_need(item: pytest.Item, key: ServerKey) -> int:
    """GPUs a test needs: its model's tp (x the engine's own data-parallel ranks), or more when
    ``@pytest.mark.gpus(n)`` says so."""
    marker = item.get_closest_marker("gpus")
    n = marker.args[0] if marker and marker.args else 0
    if not isinstance(n, int) or n < 0:
        raise pytest.UsageError(f"{item.nodeid}: gpus marker needs a non-negative int, got {n!r}")
    try:
        return max(n, gpus_per_server(key))
    except ValueError as exc:  # a data-parallel flag without a positive count
        raise pytest.UsageError(f"{item.nodeid}: {exc}") from None


def capacity_skip_reason(item: pytest.Item, profile: runners.Profile, available: int) -> str | None:
    """Why ``item`` cannot run on this machine, or None when it fits."""
    topology = topologies.topology_key(item, profile)
    if topology is not None:
        return topologies.capacity_skip_reason(topology, profile, available)
    key = server_key(item, profile)
    need = gpu_need(item, key)
    if profile.vendor == "cpu":
        marker = item.get_closest_marker("gpus")
        if marker and marker.args and marker.args[0] > 0:
            return f"capacity: needs {marker.args[0]} GPU(s); the cpu profile has none"
        if key.tp > 1:
            return f"capacity: {key.model} tp={key.tp} needs {key.tp} GPUs; the cpu profile serves tp=1"
        return None
    if need > available:
        return (f"capacity: {key.model} tp={key.tp} needs {need} GPU(s), "
                f"{available} available on this runner")
    return None


def _lane_check(item: pytest.Item, profile: runners.Profile) -> models.LaneCheck | None:
    marker = item.get_closest_marker("model")
    return models.lane_check(marker.args[0], profile.vendor) if marker and marker.args else None


def _ci_or_usage_error() -> bool:
    try:
        return envflag.in_ci()
    except envflag.FlagError as exc:
        raise pytest.UsageError(f"kiln: {exc}") from None


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker(MISSING)
    if marker is not None:
        # Under CI a prerequisite the runner lacks (a model not staged) fails the
        # test, naming it: a skip would let a runner that was never set up go green.
        pytest.fail(f"{marker.args[0]} (CI is set, so this fails instead of skipping)", pytrace=False)


def _wants_engine(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return "server" in names or "topology" in names or item.get_closest_marker("gpus") is not None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    known_issues.apply(items, profile_of(config).name, strict=config.getoption(known_issues.STRICT_OPTION))
    try:
        entries = quarantine.load(config.getoption("--kiln-quarantine") or quarantine.default_path())
    except quarantine.QuarantineError as exc:
        raise pytest.UsageError(f"kiln: {exc}") from None
    known_issues.apply_quarantine(items, profile_of(config).name, entries)
    # A test that breaks its server goes last, so no other test borrows a
    # broken server or pays for a relaunch (the sort is stable); one that
    # stops the whole pool after those, or they would relaunch what it stopped.
    items.sort(key=_disruption)
    e2e = [item for item in items if _wants_engine(item)]
    if not e2e:
        return
    profile = profile_of(config)
    found = _discovery(config)
    available = len(found.visible) if found else 0
    reasons: list[str] = []
    for item in e2e:
        marker = item.get_closest_marker("skip")
        if marker:  # skipped already (a known issue on this profile, a plain skip marker)
            reasons.append(marker.kwargs.get("reason") or (marker.args[0] if marker.args else "skip marker"))
            continue
        lane = _lane_check(item, profile)
        if lane is not None and lane.missing and _ci_or_usage_error():
            item.add_marker(getattr(pytest.mark, MISSING)(lane.reason))
            continue
        reason = (lane.reason if lane else None) or capacity_skip_reason(item, profile, available)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
            reasons.append(reason)
    # Everything skipped before a test ran: stop now, nothing to launch. Skips
    # raised while running are counted by the Tally (pytest_sessionfinish).
    line = skips.tested_nothing_line(len(e2e), reasons, profile.name,
                                     context=f"{available} GPU(s) available")
    # --collect-only plans (warmup's server keys, a shard's selection): it runs
    # nothing, so "tested nothing" is not its verdict; the run that follows says it.
    if line and not config.option.collectonly:
        raise pytest.UsageError(f"kiln: {line}")
    tally = skips.Tally(item.nodeid for item in e2e)
    config.stash[_TALLY] = tally
    config.pluginmanager.register(_TallyHook(tally), TALLY_PLUGIN)


def _disruption(item: pytest.Item) -> int:
    marker = item.get_closest_marker(DISRUPTIVE)
    return 0 if marker is None else 2 if marker.kwargs.get("pool") else 1


class _TallyHook:
    """Feeds every test report to the session's skips.Tally (a hook needs an object to live on)."""

    def __init__(self, tally: skips.Tally):
        self.tally = tally

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.tally.record(report)


def _topology(found: gpu.Discovery) -> alloc.Topology | None:
    """NVLink/NUMA layout from ``nvidia-smi topo -m``; None (consecutive devices) when unknown."""
    if found.vendor != "nvidia" or len(found.visible) < 2:
        return None
    try:
        return alloc.parse_topo(gpu_smi.run_tool(["nvidia-smi", "topo", "-m"]))
    except (gpu_smi.SmiError, ValueError, OSError) as exc:
        log.warning("no GPU topology (%s): tp>1 servers get consecutive devices", exc)
        return None


def _on_sigterm(signum, frame):
    # CI cancels a job with SIGTERM; turning it into KeyboardInterrupt lets
    # pytest unwind fixtures, so the pool still stops every server.
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_finish(session: pytest.Session) -> None:
    path = session.config.getoption("--kiln-collect-keys")
    if not path:
        return
    profile = profile_of(session.config)
    keys: dict[str, dict] = {}
    for item in session.items:
        if item.get_closest_marker("skip") or item.get_closest_marker(MISSING):
            continue
        names = getattr(item, "fixturenames", ())
        # A topology's workers are servers of one key: warmup warms that key.
        key = (server_key(item, profile) if "server" in names else
               topologies.worker_key(item, profile) if "topology" in names else None)
        if key is not None:
            keys.setdefault(str(key), {"model": key.model, "tp": key.tp, "args": list(key.args),
                                       "tests": []})["tests"].append(item.nodeid)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(list(keys.values()), indent=1))


def _say(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"kiln: {line}")
    else:
        log.warning("%s", line)


def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    profile = profile_of(config)
    # Trees a killed run on this host left behind are stopped first (never a
    # live owner's): their engines would hold memory, ports and GPUs.
    for done in reaper.reap():
        _say(config, done.line())
    backend = backend_of(config)
    config.stash[_BASELINE] = leakscan.baseline(backend)
    found = _discovery(config)
    memory, topology, visible = None, None, ()
    if found is not None:
        memory = launch.memory_guard(found)
        topology = _topology(found)
        visible = found.visible
    config.stash[_POOL_KEY] = ServerPool(_factory(config, memory), max_live=profile.max_live_servers,
                                         gpus=visible, topology=topology,
                                         gateway_factory=topologies.gateway_factory(profile, log_dir_of(config)))
    try:
        config.stash[_PREV_SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded runs): leave signals alone
        pass


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    tally = config.stash.get(_TALLY, None)
    if tally is not None and session.exitstatus == pytest.ExitCode.OK:
        line = tally.line(profile_of(config).name)
        if line:  # every e2e test skipped itself while running (a fixture, pytest.skip)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
            _say(config, line)
    pool = config.stash.get(_POOL_KEY, None)
    if pool is None:
        return
    try:
        if pool.servers():  # nothing launched (unit tests): no servers to stop, no records
            try:
                pool.close()
            finally:
                pool.write_records(artefacts.servers(config.getoption("--kiln-reports"),
                                                     session_name(config)))
        # Whether or not the pool launched anything: an engine a test started
        # by other means must not outlive the session either.
        _check_nothing_left(session)
    finally:
        prev = config.stash.get(_PREV_SIGTERM, None)
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def new_engine_processes(config: pytest.Config) -> list[procfs.Stat]:
    """Engine-looking processes new since the session started that can be this run's (ci/session/leakscan.py)."""
    return leakscan.new_engine_processes(backend_of(config), config.stash.get(_BASELINE, set()))


def _check_nothing_left(session: pytest.Session) -> None:
    """After the pool stopped everything: no engine process that was not there at the start.

    A leak fails the session: the next job on this host would run beside it.
    """
    config = session.config
    backend = backend_of(config)
    if not backend.process_names:
        return
    leaked = new_engine_processes(config)
    if leaked:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _say(config, leakscan.verdict(backend, leaked))


@pytest.fixture(scope="session")
def kiln_profile(pytestconfig: pytest.Config) -> runners.Profile:
    """The runner profile this session runs under."""
    return profile_of(pytestconfig)


@pytest.fixture(scope="session")
def kiln_pool(request: pytest.FixtureRequest, pytestconfig: pytest.Config) -> ServerPool:
    """The session's server pool (stopped at session end). The servers the collected tests
    borrow start together now, as many as fit (ServerPool.prelaunch); the rest on first borrow."""
    pool = pytestconfig.stash[_POOL_KEY]
    profile = profile_of(pytestconfig)
    if profile.vendor != "cpu":
        # Measured on the cpu lane only; GPU launches together (per-device memory
        # baselines taken side by side) have not been run on a GPU yet.
        return pool
    waits.prelaunch(pytestconfig, pool, [server_key(item, profile) for item in request.session.items
                                         if "server" in getattr(item, "fixturenames", ())
                                         and not item.get_closest_marker("skip")])
    return pool


def server_key(item: pytest.Item, profile: runners.Profile) -> ServerKey:
    marker = item.get_closest_marker("model")
    key = (ServerKey(profile.default_model) if marker is None
           else key_from_marker(marker.args, marker.kwargs, profile.default_model))
    flag = backend_of(item.config).seed_flag if item.get_closest_marker(SEEDED) else None
    if flag and flag not in key.args:
        # A key, not a second server inside the test: on a one-GPU runner the
        # test's own server would hold the only device while it asked for this one.
        key = dataclasses.replace(key, args=(*key.args, flag))
    return key


@pytest.fixture
def server(request: pytest.FixtureRequest, kiln_pool: ServerPool, kiln_profile: runners.Profile,
           record_property, record_testsuite_property) -> Server:
    """A ready server for this test's ``model`` marker, borrowed from the session pool."""
    srv = waits.acquire(request.config, kiln_pool, server_key(request.node, kiln_profile), record_property)
    version = srv.backend.version()
    if version:
        record_testsuite_property("kiln_engine_version", f"{srv.backend.name} {version}")
    request.node.stash[_SERVER] = srv
    try:
        yield srv
    finally:
        kiln_pool.release(srv, request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    srv = item.stash.get(_SERVER, None)
    if srv is not None and report.failed:
        # The engine's last words belong next to the failure, not only in the job report.
        report.sections.append((f"kiln server {srv.key} — last {srv.tail_lines} log lines",
                                srv.log_tail()))
    return report
