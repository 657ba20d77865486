"""Launch args go through the engine's own --help: profile extras degrade, test requests fail loudly."""
from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest

from ci.engine import compat
from ci.engine.backends import BackendSpec
from ci.engine.launch import launch_args
from ci.host import cachedir
from ci.profiles import runners
from ci.session.pool import ServerKey

ENGINE = textwrap.dedent("""
    import argparse
    p = argparse.ArgumentParser()
    for flag in ("--model", "--port", "--host", "--max-model-len", "--served-model-name"):
        p.add_argument(flag)
    p.parse_args()
""")


@pytest.fixture
def backend(tmp_path, monkeypatch):
    monkeypatch.setenv(cachedir.ROOT_ENV, str(tmp_path / "cache"))
    script = tmp_path / "engine.py"
    script.write_text(ENGINE)
    # "pytest" stands in for the engine's distribution: installed, so the version is known.
    return BackendSpec(name="toy", distributions=("pytest",),
                       argv=lambda model, port, tp, args: [sys.executable, str(script), "--model", model,
                                                           "--port", str(port), *args])


def _profile(*server_args: str) -> runners.Profile:
    return dataclasses.replace(runners.get_profile("cpu"), server_args=server_args)


def test_flags_the_engine_knows_are_kept(backend):
    _, args, _ = launch_args(_profile("--max-model-len", "512"), ServerKey("m", 1, ("--host", "x")), backend)
    assert args == ("--max-model-len", "512", "--host", "x")


def test_a_profile_flag_the_engine_lacks_is_dropped_with_a_warning(backend, caplog):
    _, args, _ = launch_args(_profile("--kv-cache-memory-bytes", "64", "--max-model-len", "512"),
                             ServerKey("m"), backend)
    assert args == ("--max-model-len", "512")
    assert "does not support flag --kv-cache-memory-bytes; running without it" in caplog.text


def test_a_flag_the_test_asked_for_fails_loudly(backend):
    with pytest.raises(compat.FeatureUnavailable, match="flag --enable-metrics was requested but toy"):
        launch_args(_profile(), ServerKey("m", 1, ("--enable-metrics",)), backend)


def test_generic_backends_are_not_probed(tmp_path):
    from ci.engine.backends import generic
    _, args, _ = launch_args(_profile("--anything"), ServerKey("m", 1, ("--b",)), generic("x --port {port}"))
    assert args == ("--anything", "--b")


def test_tp_args_go_to_tp2_servers_of_h200_profiles_only():
    from ci.profiles import runners
    from ci.session.pool import ServerKey

    h200 = runners.get_profile("h200-2")
    _, tp2, _ = launch_args(h200, ServerKey("Qwen/Qwen2.5-0.5B-Instruct", 2))
    _, tp1, _ = launch_args(h200, ServerKey("Qwen/Qwen2.5-0.5B-Instruct", 1))
    assert tp2[:2] == ("--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}')
    assert "--compilation-config" not in tp1
    _, h100, _ = launch_args(runners.get_profile("h100-2"), ServerKey("Qwen/Qwen2.5-0.5B-Instruct", 2))
    assert "--compilation-config" not in h100
