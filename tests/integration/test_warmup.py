"""Warmup against real processes: cold then warm, timeouts, crash signatures, --cold, GPU scheduling.

Engines are the fakes in tests/fakes (fault_engine.py, crashy_engine.py),
launched through ``ci.engine.backends.generic`` by the real Server on 127.0.0.1.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from ci.engine import caches
from ci.engine.backends import generic
from ci.engine.server import Server
from ci.host import procs
from ci.profiles import runners
from ci.warmup.run import WarmupFailed, WarmupSpec, format_table, run_warmup

FAKES = Path(__file__).resolve().parents[1] / "fakes"
CPU = runners.get_profile("cpu")
# Fakes are ready in well under a second; these bound each failure mode.
SHORT_LAUNCH_S = 3.0
GRACE_S = 1.0
HW = {"machine": "x86_64", "cpu_model": "test", "cpu_isa": "avx2"}


def crashy(*flags: str, name: str = "crashy"):
    cmd = f"{{python}} {shlex.quote(str(FAKES / 'crashy_engine.py'))} --port {{port}} --model {{model}} "
    return generic(cmd + " ".join(flags), name=name)


def fault(mode: str):
    return generic(f"{{python}} {shlex.quote(str(FAKES / 'fault_engine.py'))} --port {{port}} --mode {mode}",
                   name=f"fault-{mode}")


class Factory:
    """Counts and keeps the servers warmup creates; short grace so kill paths are quick."""

    def __init__(self):
        self.servers: list[Server] = []
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs) -> Server:
        server = Server(*args, grace_s=GRACE_S, **kwargs)
        with self.lock:
            self.servers.append(server)
        return server


def warm(specs, backend, tmp_path, factory=None, **kw):
    kw.setdefault("profile", CPU)
    kw.setdefault("launch_timeout_s", SHORT_LAUNCH_S)
    kw.setdefault("request_timeout_s", 5.0)
    kw.setdefault("hardware", HW)
    return run_warmup(specs, backend=backend, root=tmp_path / "cache", log_dir=tmp_path / "logs",
                      server_factory=factory or Factory(), **kw)


def assert_tree_gone(server: Server) -> None:
    assert server.tree is not None
    assert procs.tagged(server.tree.tag) == [], "tagged processes survived"


SPECS = [WarmupSpec("model-a", 1, ("--x", "1")), WarmupSpec("model-b", 1)]


def test_cold_then_warm_launches_nothing_the_second_time(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    backend = crashy("--fill-cache")
    first = Factory()
    results = warm(SPECS, backend, tmp_path, first)
    assert [r.state for r in results] == ["cold", "cold"], format_table(results)
    assert len(first.servers) == 2
    for r in results:
        assert r.marker.is_file()
    # The engine wrote its "kernels" where kiln pointed it.
    kernels = list((tmp_path / "cache" / "jit" / "crashy" / "triton").glob("kernel-*.bin"))
    assert len(kernels) == 2
    assert "last 50 log lines" in caplog.text  # the log tail is shown on the success path too

    spawned = []
    real_popen = subprocess.Popen

    def counting_popen(*a, **k):
        spawned.append(a[0] if a else k.get("args"))
        return real_popen(*a, **k)
    monkeypatch.setattr(subprocess, "Popen", counting_popen)
    second = Factory()
    t0 = time.monotonic()
    results = warm(SPECS, backend, tmp_path, second)
    assert [r.state for r in results] == ["warm", "warm"]
    assert second.servers == [] and spawned == [], f"warm path launched {spawned}"
    # Reading two markers: well under a second on an idle runner; generous for a loaded one.
    assert time.monotonic() - t0 < 3.0
    assert "model-a|tp=1|--x 1" in format_table(results) and "warm" in format_table(results)


def test_changed_spec_args_are_cold_again(tmp_path):
    backend = crashy()
    warm(SPECS[:1], backend, tmp_path)
    changed = [dataclasses.replace(SPECS[0], args=("--x", "2"))]
    assert [r.state for r in warm(changed, backend, tmp_path)] == ["cold"]


def test_timeout_kills_the_whole_tree_including_a_detached_grandchild(tmp_path):
    factory = Factory()
    t0 = time.monotonic()
    results = warm(SPECS[:1], crashy("--health never", "--ignore-term", "--grandchild"), tmp_path, factory)
    elapsed = time.monotonic() - t0
    (r,) = results
    assert r.state == "failed" and "not ready after 3 s" in r.error
    assert "\n" not in r.error
    # launch deadline + SIGTERM grace + SIGKILL/reap (slack for a loaded runner), not a hang.
    assert elapsed < SHORT_LAUNCH_S + GRACE_S + 10.0, elapsed
    (server,) = factory.servers
    assert "grandchild" in server.log_tail() and "SIGTERM ignored" in server.log_tail()
    assert_tree_gone(server)
    assert not r.marker.exists()


def test_request_that_hangs_times_out_and_leaves_nothing(tmp_path):
    factory = Factory()
    (r,) = warm(SPECS[:1], crashy("--completion hang", "--grandchild"), tmp_path, factory, request_timeout_s=1.0)
    assert r.state == "failed" and r.error == "warmup request: no answer within 1 s (ReadTimeout)"
    assert_tree_gone(factory.servers[0])


def test_crash_signature_ends_the_launch_long_before_its_timeout(tmp_path):
    # The engine prints a traceback and keeps running without ever being
    # healthy: only the watchdog can end this before the 60 s deadline.
    factory = Factory()
    t0 = time.monotonic()
    (r,) = warm(SPECS[:1], crashy("--health never", "--traceback-after 0.5"), tmp_path, factory,
                launch_timeout_s=60.0)
    elapsed = time.monotonic() - t0
    # Far below the 60 s deadline even on a loaded runner.
    assert elapsed < 20.0, f"watchdog did not end the launch early ({elapsed:.1f} s)"
    assert r.state == "failed"
    assert r.error.startswith("crash signature (Traceback) in the log during warmup: Traceback (most recent call last)")
    assert_tree_gone(factory.servers[0])


def test_shutdown_traceback_is_not_a_crash(tmp_path):
    factory = Factory()
    (r,) = warm(SPECS[:1], crashy("--shutdown-traceback"), tmp_path, factory)
    assert r.state == "cold", r.error
    assert "Traceback" in factory.servers[0].log_tail()


def test_engine_exit_is_a_failure_nonfatal_by_default_and_fatal_when_strict(tmp_path):
    # fault_engine --mode crash prints a traceback and exits 3 (test_server_faults.py's fake).
    specs = [WarmupSpec("model-a"), WarmupSpec("model-b")]
    crash, ok = fault("crash"), crashy()
    results = warm(specs[:1], crash, tmp_path) + warm(specs[1:], ok, tmp_path)
    assert [r.state for r in results] == ["failed", "cold"]
    assert "exited with code 3" in results[0].error or "crash signature" in results[0].error
    assert "FAILED model-a" in format_table(results)
    with pytest.raises(WarmupFailed) as err:
        warm(specs[:1], crash, tmp_path, strict=True)
    assert "1 of 1 warmup(s) failed" in str(err.value)
    assert err.value.results[0].state == "failed"


def test_model_that_cannot_be_prepared_fails_its_spec_alone(tmp_path):
    # The chain's container cannot fetch the real model's wheel; that spec
    # fails naming why, launches nothing, and the next spec still warms.
    specs = [WarmupSpec(str(tmp_path / "no-such-model-dir")), WarmupSpec("model-b")]
    factory = Factory()
    results = warm(specs, crashy(), tmp_path, factory)
    assert [r.state for r in results] == ["failed", "cold"], format_table(results)
    assert "model not prepared" in results[0].error and "does not exist" in results[0].error
    assert len(factory.servers) == 1
    with pytest.raises(WarmupFailed, match="1 of 2 warmup"):
        warm(specs, crashy(), tmp_path, strict=True)


def test_cold_clears_only_kiln_caches(tmp_path, monkeypatch):
    # The job's own cache settings point somewhere kiln does not own.
    users = tmp_path / "home-triton"
    users.mkdir()
    (users / "user-kernel.bin").write_text("keep")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(users))
    backend = crashy("--fill-cache")
    first = warm(SPECS, backend, tmp_path)
    root = tmp_path / "cache"
    engine = root / "jit" / "crashy"
    old_kernels = set((engine / "triton").glob("kernel-*.bin"))
    assert len(old_kernels) == 2 and list(users.iterdir()) == [users / "user-kernel.bin"]
    sibling = root / "jit" / "other-engine"
    caches.engine_cache_env("other-engine", root)
    (sibling / "triton").mkdir()
    (sibling / "triton" / "k.bin").write_text("keep")
    (root / "models" / "tiny-llama").mkdir(parents=True)
    (root / "models" / "tiny-llama" / "w").write_text("keep")

    # Cold for one spec re-colds its engine: the other spec's marker went with the caches.
    again = warm(SPECS[:1], backend, tmp_path, cold=True)
    assert [r.state for r in again] == ["cold"]
    assert not first[1].marker.exists()
    new_kernels = set((engine / "triton").glob("kernel-*.bin"))
    assert len(new_kernels) == 1 and not (new_kernels & old_kernels)
    assert (sibling / "triton" / "k.bin").read_text() == "keep"
    assert (root / "models" / "tiny-llama" / "w").read_text() == "keep"
    assert (users / "user-kernel.bin").read_text() == "keep" and len(list(users.iterdir())) == 1
    assert [r.state for r in warm(SPECS, backend, tmp_path)] == ["warm", "cold"]


def test_specs_run_concurrently_on_disjoint_gpus(tmp_path):
    # Two visible GPUs: three tp=1 specs run two at a time, each on its own
    # GPU; a tp=4 spec cannot fit and fails with the reason.
    profile = runners.get_profile("h100-2")
    discovery = SimpleNamespace(vendor="nvidia", visible=(0, 1), devices=())
    specs = [WarmupSpec(f"model-{i}") for i in range(3)] + [WarmupSpec("big", tp=4)]
    factory = Factory()
    t0 = time.monotonic()
    results = warm(specs, crashy("--ready-after 1.0"), tmp_path, factory, profile=profile,
                   discovery=discovery, hardware={"gpu_names": "fake", "driver": "0"}, memory=None)
    elapsed = time.monotonic() - t0
    assert [r.state for r in results] == ["cold", "cold", "cold", "failed"]
    assert results[3].error == "needs 4 GPU(s); 2 visible"
    serial = sum(s.record.stopped - s.record.launched for s in factory.servers)
    assert elapsed < serial, f"not concurrent: {elapsed:.1f} s for {serial:.1f} s of launches"
    # What each engine process saw, from its own log.
    seen = [re.search(r"CUDA_VISIBLE_DEVICES=(\S*)", s.log_tail()).group(1) for s in factory.servers]
    spans = [(s.record.launched, s.record.stopped, tuple(s.devices), v) for s, v in zip(factory.servers, seen)]
    for a in spans:
        assert len(a[2]) == 1 and a[3] == str(a[2][0]), a
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, "no two warmups overlapped"
    assert all(a[2] != b[2] for a, b in overlapping), "overlapping warmups shared a GPU"


def test_cancel_stops_live_servers(tmp_path):
    # A KeyboardInterrupt (CI's SIGTERM) while a spec runs must leave no tree.
    factory = Factory()
    original = Server.start

    def start_then_interrupt(self):
        original(self)
        raise KeyboardInterrupt("cancelled")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Server, "start", start_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            warm(SPECS[:1], crashy("--grandchild"), tmp_path, factory)
    assert_tree_gone(factory.servers[0])
    assert not any("crashy_engine" in " ".join(_cmdline(p)) for p in psutil.Process().children(recursive=True))


def _cmdline(proc: psutil.Process) -> list[str]:
    # This process is a subreaper: an earlier test's orphan may sit here as a zombie
    # (no command line to read) or go while the list is walked.
    try:
        return proc.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return []


E2E_TESTS = '''
import pytest

@pytest.mark.model("m1", args=["--max-num-seqs", "8"])
def test_a(server): pass

@pytest.mark.model("m1", args=["--max-num-seqs", "8"])
def test_b(server): pass

@pytest.mark.model("m2", args="--seed 2")
def test_c(server): pass

def test_default_model(server): pass

def test_no_server(): pass
'''


def test_specs_come_from_the_tests_own_declarations(tmp_path):
    from ci.warmup.run import WarmupError, collect_specs, load_specs, select
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "test_decl.py").write_text(E2E_TESTS)
    specs = collect_specs("cpu", tmp_path / "e2e")
    assert [(s.model, s.tp, s.args) for s in specs] == [
        ("m1", 1, ("--max-num-seqs", "8")), ("m2", 1, ("--seed", "2")), (CPU.default_model, 1, ())]
    assert len(specs[0].tests) == 2  # one spec, both tests
    assert select(specs, ["m2"]) == [specs[1]]
    with pytest.raises(WarmupError, match=r"--model nope: no e2e test declares it; declared: m1, m2, tiny-llama"):
        select(specs, ["nope"])
    (tmp_path / "keys.json").write_text('[{"model": "m3", "tp": 4, "args": ["-x"], "tests": ["t::a"]}]')
    assert load_specs(tmp_path / "keys.json") == [WarmupSpec("m3", 4, ("-x",))]
    (tmp_path / "bad.json").write_text('[{"model": 1}]')
    with pytest.raises(WarmupError, match="not a list of"):
        load_specs(tmp_path / "bad.json")
    with pytest.raises(WarmupError, match="cannot read collected keys"):
        load_specs(tmp_path / "absent.json")
    (tmp_path / "e2e" / "test_broken.py").write_text("import no_such_module_kiln\n")
    with pytest.raises(WarmupError, match=r"collecting e2e specs failed \(pytest exit 2\)"):
        collect_specs("cpu", tmp_path / "e2e")


def test_nothing_declared_is_empty_and_strict_says_so(tmp_path):
    assert warm([], crashy(), tmp_path) == []
    with pytest.raises(WarmupFailed, match="nothing to warm"):
        warm([], crashy(), tmp_path, strict=True)


def test_two_generic_engines_do_not_share_markers(tmp_path):
    # Same backend name ("generic"), different engines: a marker of one is foreign to the other.
    template = f"{{python}} {shlex.quote(str(FAKES / 'crashy_engine.py'))} --port {{port}} --model {{model}}"
    assert [r.state for r in warm(SPECS[:1], generic(template), tmp_path)] == ["cold"]
    assert [r.state for r in warm(SPECS[:1], generic(template), tmp_path)] == ["warm"]
    assert [r.state for r in warm(SPECS[:1], generic(template + " --ready-after 0.1"), tmp_path)] == ["cold"]


def test_cli_prints_the_table_and_exits_by_outcome(tmp_path):
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "test_cli.py").write_text(
        "import pytest\n\n@pytest.mark.model('cli-model')\ndef test_a(server): pass\n")
    env = {**os.environ, "KILN_CACHE_DIR": str(tmp_path / "cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ci.warmup", "--profile", "cpu", "--tests",
                               str(tmp_path / "e2e"), "--log-dir", str(tmp_path / "logs"), *args],
                              cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
                              text=True, timeout=120)
    ok = f"generic:{{python}} {FAKES / 'crashy_engine.py'} --port {{port}} --model {{model}}"
    crash = f"generic:{{python}} {FAKES / 'fault_engine.py'} --port {{port}} --mode crash"
    first = cli("--backend", ok)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[0].split() == ["spec", "state", "seconds", "marker"]
    assert "cli-model|tp=1|  cold" in first.stdout and str(tmp_path / "cache" / "jit") in first.stdout
    assert "warmup [1/1] cli-model|tp=1|: launching" in first.stderr  # progress lines
    assert "cli-model|tp=1|  warm" in cli("--backend", ok).stdout
    failed = cli("--backend", crash, "--strict")
    assert failed.returncode == 1 and "FAILED cli-model|tp=1|: generic exited with code 3" in failed.stdout
    assert cli("--backend", crash).returncode == 0  # failures are reported, not fatal, by default
    bad = cli("--model", "nope")
    assert bad.returncode == 2 and "--model nope: no e2e test declares it" in bad.stderr
