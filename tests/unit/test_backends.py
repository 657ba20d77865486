"""Backend specs build the right commands and reject bad input clearly."""
from __future__ import annotations

import dataclasses

import pytest

from ci.engine.backends import get_backend
from ci.session.pool import ServerKey, key_from_marker


@pytest.mark.parametrize("name, tp, expect", [
    ("vllm", 4, ["-m", "vllm.entrypoints.openai.api_server", "--tensor-parallel-size", "4"]),
    ("vllm-cpu", 1, ["-m", "vllm.entrypoints.openai.api_server"]),
    ("sglang", 2, ["-m", "sglang.launch_server", "--tp-size", "2"]),
])
def test_commands(name, tp, expect):
    argv = get_backend(name).command("m", 23456, tp, ["--extra"])
    assert all(part in argv for part in expect)
    assert argv[argv.index("--port") + 1] == "23456"
    assert argv[-1] == "--extra"
    if tp == 1:
        assert "--tensor-parallel-size" not in argv and "--tp-size" not in argv


def test_every_sglang_launch_has_metrics_and_the_device_timer_the_kits_read():
    # SGLang serves /metrics only with --enable-metrics and publishes fwd_occupancy
    # only with SGLANG_ENABLE_METRICS_DEVICE_TIMER=1 (sglang #25886): the AMD
    # profiles once launched without the flag, failing every metrics kit.
    sglang = get_backend("sglang")
    assert sglang.command("m", 30000, 1).count("--enable-metrics") == 1
    assert sglang.command("m", 30000, 1, ["--enable-metrics"]).count("--enable-metrics") == 1
    assert dict(sglang.env)["SGLANG_ENABLE_METRICS_DEVICE_TIMER"] == "1"
    assert sglang.gauges.occupancy_full == 100.0  # a percentage gauge
    assert sglang.health_path == "/health_generate"
    assert "TVM_FFI_CACHE_DIR" in dict(sglang.cache_vars)
    # vLLM needs no flag: its metrics are on unless hidden.
    assert get_backend("vllm").metrics_flag is None
    # Seen on an H100 with SGLang 0.5.17: another model name is served (200), and a
    # request's seed is ignored unless the engine runs deterministic inference.
    assert not sglang.rejects_unknown_model and get_backend("vllm").rejects_unknown_model
    assert sglang.seed_flag == "--enable-deterministic-inference" and get_backend("vllm").seed_flag is None


def test_generic_template_fills_port_and_model():
    b = get_backend("generic:{python} -m my.engine --model {model} --port {port} --tp {tp}")
    argv = b.command("mymodel", 30001, 2)
    assert argv[1:] == ["-m", "my.engine", "--model", "mymodel", "--port", "30001", "--tp", "2"]


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown backend 'nope'"),
    ("generic:", "empty command template"),
    ("generic:{python} serve", "must contain {port}"),
    ("generic:x --port {port} {gpu}", "unknown placeholder"),
])
def test_bad_backends(spec, message):
    with pytest.raises(ValueError, match=message):
        get_backend(spec).command("m", 30000, 1)


def test_bad_tp_and_port():
    b = get_backend("vllm")
    with pytest.raises(ValueError, match="tp must be"):
        b.command("m", 30000, 0)
    with pytest.raises(ValueError, match="port out of range"):
        b.command("m", 70000, 1)


def test_model_marker_keys():
    assert key_from_marker(("m",), {"tp": 2, "args": "--a 1"}, "d") == ServerKey("m", 2, ("--a", "1"))
    assert key_from_marker((), {}, "d") == ServerKey("d")
    with pytest.raises(ValueError, match="unknown keyword"):
        key_from_marker(("m",), {"tensor_parallel": 2}, "d")
    with pytest.raises(ValueError, match="tp must be a positive int"):
        key_from_marker(("m",), {"tp": 0}, "d")


def test_a_served_name_is_given_to_the_command_and_the_server_not_parsed_from_args(tmp_path):
    from ci.engine.backends import generic
    from ci.engine.server import Server

    argv = get_backend("vllm").command("/models/x", 30000, 1, ["--extra"], served_name="tiny-llama")
    assert argv[-3:] == ["--extra", "--served-model-name", "tiny-llama"]
    assert "--served-model-name" not in get_backend("vllm").command("hub/id", 30000, 1, served_name="hub/id")
    server = Server(get_backend("vllm"), "/models/x", served_name="tiny-llama", log_dir=tmp_path)
    assert server.served_model == "tiny-llama"
    assert Server(get_backend("vllm"), "hub/id", log_dir=tmp_path).served_model == "hub/id"
    # An engine that cannot rename refuses a renamed launch in one line.
    fixed = dataclasses.replace(generic("x --port {port}"), served_name_flag=None)
    with pytest.raises(ValueError, match="cannot serve /models/x under another name"):
        fixed.command("/models/x", 30000, 1, served_name="tiny-llama")
