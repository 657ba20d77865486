"""Capability probes: keywords via inspect.signature, CLI flags via a cached --help."""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap

import pytest

from ci.engine import compat
from ci.engine.backends import generic
from ci.engine.compat import FeatureUnavailable, FlagProbe, HelpCache


def servicer(model, *, port=0, enable_metrics=False):  # a stand-in engine entry point
    return model, port, enable_metrics


def catch_all(model, **kwargs):
    return model, kwargs


def positional_only(model, tp, /):
    return model, tp


def test_accepts_keyword_reads_the_signature():
    assert compat.accepts_keyword(servicer, "enable_metrics")
    assert compat.accepts_keyword(servicer, "model")
    assert not compat.accepts_keyword(servicer, "enable_lora")
    # **kwargs proves nothing; positional-only cannot be passed by keyword.
    assert not compat.accepts_keyword(catch_all, "enable_metrics")
    assert not compat.accepts_keyword(positional_only, "tp")


def test_filter_kwargs_drops_and_warns_unless_requested(caplog):
    kwargs = {"port": 1, "enable_lora": True}
    with caplog.at_level(logging.WARNING, logger="ci.engine.compat"):
        assert compat.filter_kwargs(servicer, kwargs, engine="sglang", version="0.4.0") == {"port": 1}
    assert "sglang 0.4.0 does not support keyword 'enable_lora'; running without it" in caplog.text
    with pytest.raises(FeatureUnavailable, match=r"^keyword 'enable_lora' was requested but sglang "
                                                 r"0.4.0 does not support it; sglang 0.5.1 has it$"):
        compat.filter_kwargs(servicer, kwargs, engine="sglang", version="0.4.0",
                             requested=["enable_lora"], since={"enable_lora": "0.5.1"})


def test_parse_help_flags_reads_a_real_argparse_help():
    parser = argparse.ArgumentParser(prog="engine")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--enable-metrics", action=argparse.BooleanOptionalAction)
    parser.add_argument("--compilation-config.level", dest="lvl")
    flags = compat.parse_help_flags(parser.format_help() + "\nsee --docs-url.")
    assert {"--max-model-len", "--enable-metrics", "--no-enable-metrics", "--help",
            "--compilation-config.level", "--docs-url"} <= flags
    assert "--max-model-len MAX_MODEL_LEN" not in flags and "-h" not in flags


@pytest.fixture
def fake_help(tmp_path):
    """An 'engine' whose --help lists FLAGS and counts how often it ran."""
    runs = tmp_path / "runs"
    script = tmp_path / "engine.py"
    script.write_text(textwrap.dedent(f"""
        import argparse, sys
        with open({str(runs)!r}, "a") as fh:
            fh.write("x")
        p = argparse.ArgumentParser(prog="engine")
        for flag in sys.argv[1].split(","):
            p.add_argument(flag)
        p.parse_args(sys.argv[2:])
    """))

    def argv(flags: str) -> list[str]:
        return [sys.executable, str(script), flags, "--help"]

    def count() -> int:
        return len(runs.read_text()) if runs.exists() else 0

    return argv, count


def test_help_runs_once_per_version_and_is_cached_in_a_file(tmp_path, fake_help):
    argv, count = fake_help
    cache = HelpCache(tmp_path / "cache" / "flags.json")
    probe = FlagProbe("vllm", "0.32.0", argv("--enable-metrics,--port"), cache=cache)
    assert probe.has("--enable-metrics") and not probe.has("--enable-lora")
    assert count() == 1  # one run served both questions
    again = FlagProbe("vllm", "0.32.0", argv("--port"), cache=HelpCache(cache.path))
    assert again.has("--enable-metrics") and count() == 1  # a new probe read the file
    upgraded = FlagProbe("vllm", "0.33.0", argv("--port,--enable-lora"), cache=cache)
    assert upgraded.has("--enable-lora") and count() == 2  # a new version re-probes
    assert cache.versions_with("vllm", "--port") == ["0.32.0", "0.33.0"]


def test_unknown_version_probes_once_per_probe_and_caches_nothing(tmp_path, fake_help):
    argv, count = fake_help
    cache = HelpCache(tmp_path / "flags.json")
    probe = FlagProbe("eng", None, argv("--a,--b"), cache=cache)
    assert probe.has("--a") and probe.has("--b") and count() == 1
    assert not cache.path.exists()


def test_filter_flags_drops_a_missing_flag_with_its_values(tmp_path, fake_help, caplog):
    argv, _ = fake_help
    probe = FlagProbe("vllm", "0.31.0", argv("--port,--max-model-len"), cache=HelpCache(tmp_path / "f.json"))
    args = ["--max-model-len", "512", "--speculative-config", "a", "b", "--port=9", "--kv-offset", "-1"]
    with caplog.at_level(logging.WARNING, logger="ci.engine.compat"):
        kept = compat.filter_flags(probe, args)
    assert kept == ["--max-model-len", "512", "--port=9"]
    assert "vllm 0.31.0 does not support flag --speculative-config; running without it" in caplog.text


def test_explicitly_requested_missing_flag_fails_naming_a_version_seen_here(tmp_path, fake_help):
    argv, _ = fake_help
    cache = HelpCache(tmp_path / "f.json")
    FlagProbe("sglang", "0.5.2", argv("--port,--enable-metrics"), cache=cache).flags()
    old = FlagProbe("sglang", "0.4.1", argv("--port,--model"), cache=cache)
    with pytest.raises(FeatureUnavailable, match=r"^flag --enable-metrics was requested but sglang "
                                                 r"0.4.1 does not support it; sglang 0.5.2 has it$"):
        compat.filter_flags(old, ["--enable-metrics"], requested=["--enable-metrics"])
    with pytest.raises(FeatureUnavailable, match="kiln knows no version that has it"):
        compat.filter_flags(old, ["--enable-lora"], requested=["--enable-lora"])


def test_corrupt_cache_costs_a_reprobe_not_a_failure(tmp_path, fake_help):
    argv, count = fake_help
    cache = HelpCache(tmp_path / "f.json")
    cache.path.write_text("{torn")
    assert FlagProbe("e", "1", argv("--a,--b"), cache=cache).has("--a") and count() == 1
    assert cache.get("e", "1") == frozenset({"--a", "--b", "--help"})


def test_a_failing_help_is_a_clear_error_and_is_not_cached(tmp_path):
    cache = HelpCache(tmp_path / "f.json")
    bad = FlagProbe("e", "1", [sys.executable, "-c", "import sys; print('boom: no torch'); sys.exit(3)"],
                    cache=cache)
    with pytest.raises(RuntimeError, match=r"^e --help exited 3 without a usable help text: boom: no torch"):
        bad.flags()
    assert cache.get("e", "1") is None


def test_a_hanging_help_times_out(tmp_path):
    hang = FlagProbe("e", "1", [sys.executable, "-c", "import threading; threading.Event().wait(30)"],
                     timeout_s=0.5)
    with pytest.raises(RuntimeError, match=r"^e --help did not finish in 0.5 s"):
        hang.flags()


def test_for_backend_runs_the_launch_command_with_help(tmp_path, fake_help):
    argv, count = fake_help
    script, flags = argv("--port,--model")[1:3]
    backend = generic(f"{{python}} {script} {flags} --model {{model}} --port {{port}}")
    probe = FlagProbe.for_backend(backend, cache=HelpCache(tmp_path / "f.json"))
    assert probe.help_argv[-1] == "--help" and probe.has("--model") and count() == 1


def test_split_flags_keeps_negative_numbers_as_values():
    assert compat.split_flags(["pos", "--a", "-1", "--b=2", "--c"]) == [["pos"], ["--a", "-1"], ["--b=2"], ["--c"]]
