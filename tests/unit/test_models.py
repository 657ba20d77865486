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


def test_the_real_model_runs_on_the_cpu_lane_only():
    assert models.lane_skip_reason(models.REAL_MODEL, "cpu") is None
    assert models.lane_skip_reason(models.TINY_MODEL, "nvidia") is None
    reason = models.lane_skip_reason(models.REAL_MODEL, "nvidia")
    assert reason and "cpu lane only" in reason


def test_gpu_profiles_skip_real_model_tests_at_collection_and_warm_no_such_server(tmp_path):
    # On a GPU profile the real model's tests are skipped at collection, before
    # any server is asked for, so warmup (which reads these keys) never tries
    # to build the model. (Were they left to the capacity check instead, this
    # 0-GPU machine would end the run with "all e2e tests were skipped".)
    from ci.engine import realmodel
    keys = tmp_path / "keys.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/e2e/test_reference.py", "--kiln-profile=h200-1", f"--kiln-collect-keys={keys}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(keys.read_text()) == []
    assert realmodel.MODEL_NAME == models.REAL_MODEL
