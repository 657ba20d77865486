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


def test_the_machines_server_args_follow_the_profiles_and_are_refused_when_missing(backend, monkeypatch):
    # $KILN_SERVER_ARGS: what this machine's engine build needs on every launch (a
    # staged SGLang without FA3: --attention-backend triton), quoted as a shell would.
    monkeypatch.setenv("KILN_SERVER_ARGS", "--host '127.0.0.2'")
    _, args, _ = launch_args(_profile("--max-model-len", "512"), ServerKey("m", 1, ("--port", "9")), backend)
    assert args == ("--max-model-len", "512", "--host", "127.0.0.2", "--port", "9")
    # Asked for, not a profile default: a flag the engine lacks fails the launch.
    monkeypatch.setenv("KILN_SERVER_ARGS", "--attention-backend triton")
    with pytest.raises(compat.FeatureUnavailable, match="flag --attention-backend was requested"):
        launch_args(_profile(), ServerKey("m"), backend)
    monkeypatch.setenv("KILN_SERVER_ARGS", "--host 'unclosed")
    with pytest.raises(ValueError, match=r"^\$KILN_SERVER_ARGS cannot be split into args"):
        launch_args(_profile(), ServerKey("m"), backend)


def test_sglang_profiles_get_no_vllm_args():
    sglang = runners.get_profile("h200-2-sglang")
    assert sglang.backend == "sglang" and sglang.tp_args == () and sglang.server_args == ()
    assert sglang.image == "docker.io/lmsysorg/sglang:v0.5.17-cu130"


def _kv_sizes(args) -> list[str]:
    """Every --kv-cache-memory-bytes value in ``args``, in order (the engine takes the last)."""
    return [args[i + 1] for i, a in enumerate(args) if a == "--kv-cache-memory-bytes"]


def test_the_real_model_runs_uncompiled_on_cpu_only_in_the_dtype_its_key_asks_for(monkeypatch):
    from ci.engine import launch, realmodel
    # Resolving kiln's real model would fetch and convert it; the args are the question here.
    monkeypatch.setattr(launch.models, "resolve", lambda name: (f"/models/{name}", name))
    cpu, h200 = runners.get_profile("cpu"), runners.get_profile("h200-1")
    _, args, served = launch_args(cpu, ServerKey(realmodel.MODEL_NAME, 1, realmodel.serve_args("float32")))
    assert served == realmodel.MODEL_NAME
    # The key's --dtype comes after the profile's bfloat16: the engine takes the last one.
    assert args[-6:] == ("--compilation-config", '{"mode": 0}', "--kv-cache-memory-bytes",
                         str(runners.SMOLLM2_CPU_KV_BYTES), "--dtype", "float32")
    # Its KV size comes after the profile's (the tiny model's), so it is the one taken.
    assert _kv_sizes(args) == [str(runners.CPU_KV_BYTES), str(runners.SMOLLM2_CPU_KV_BYTES)]
    _, args, _ = launch_args(cpu, ServerKey("tiny-llama"))
    assert "--compilation-config" not in args
    assert _kv_sizes(args) == [str(runners.CPU_KV_BYTES)]
    _, args, _ = launch_args(h200, ServerKey(realmodel.MODEL_NAME, 1, realmodel.serve_args("bfloat16")))
    assert args == ("--dtype", "bfloat16")
    with pytest.raises(ValueError, match="smollm2-135m is served in float32 or bfloat16, not 'float16'"):
        realmodel.serve_args("float16")
