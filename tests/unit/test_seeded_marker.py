"""A seeded test's server is its own key (the backend's seed flag added), never a second server inside the test.

On a one-GPU H100 the SGLang run failed `test_seed_makes_sampling_reproducible`
with "device unavailable: need 1 GPU(s): 0 free": the test held its default
server and asked the pool for a seeded one (docs/gpu-verification.md, issue 21).
"""
from __future__ import annotations

import pytest

from ci.session import pytest_plugin
from ci.session.pool import ServerKey


class _Config:
    def __init__(self, profile: str, backend: str | None = None):
        self._options = {"--kiln-profile": profile, "--kiln-backend": backend, "--kiln-model": None}

    def getoption(self, name, default=None):
        return self._options.get(name, default)


class _Item:
    def __init__(self, config, *marks):
        self.config = config
        self._marks = {mark.name: mark for mark in marks}

    def get_closest_marker(self, name):
        return self._marks.get(name)


def _key(profile: str, *marks, backend: str | None = None) -> ServerKey:
    config = _Config(profile, backend)
    return pytest_plugin.server_key(_Item(config, *marks), pytest_plugin.profile_of(config))


SEEDED = getattr(pytest.mark, pytest_plugin.SEEDED).mark


def test_sglang_seeded_test_borrows_a_deterministic_server():
    assert _key("h100-1-sglang", SEEDED) == ServerKey("Qwen/Qwen2.5-0.5B-Instruct", 1,
                                                       ("--enable-deterministic-inference",))


def test_the_flag_joins_the_model_markers_own_args_once():
    model = pytest.mark.model("m", tp=2, args=["--x", "--enable-deterministic-inference"]).mark
    assert _key("h100-2-sglang", model, SEEDED) == ServerKey("m", 2, ("--x", "--enable-deterministic-inference"))


def test_vllm_honours_seeds_on_its_default_server():
    assert _key("cpu", SEEDED) == _key("cpu")
    assert _key("h100-1", SEEDED) == ServerKey(_key("h100-1").model)


def test_kiln_backend_option_decides_the_flag():
    assert _key("h100-1", SEEDED, backend="sglang").args == ("--enable-deterministic-inference",)


def test_unmarked_tests_keep_the_default_server():
    assert _key("h100-1-sglang") == ServerKey("Qwen/Qwen2.5-0.5B-Instruct")
