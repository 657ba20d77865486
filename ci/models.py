"""Which model a run serves: a hub id, a local directory, or one of kiln's own local models.

``--kiln-model NAME_OR_PATH`` (or ``$KILN_MODEL``) replaces the profile's
default model for every test that does not name one (ci/pytest_plugin.py).
GPU profiles default to a hub model; air-gapped runners and the device machine
reach no hub, so they point the same suites at a directory or at kiln's tiny
model (``tiny-llama``, written by ci/tinymodel.py).
"""
from __future__ import annotations

import os
from pathlib import Path

MODEL_ENV = "KILN_MODEL"
# Names of local models kiln builds itself (no model hub on CI machines).
LOCAL_MODELS = ("tiny-llama",)
# What a local directory must hold for vLLM/SGLang to load it as a HF model.
_MODEL_DIR_MARKER = "config.json"


class ModelError(ValueError):
    """A model reference that cannot be served; one line naming it and the cause."""


def _looks_like_path(name: str) -> bool:
    # A hub id is "org/name" (or "name"); anything rooted, relative-dotted or
    # home-relative is meant as a directory, and a missing one must not be
    # sent to the hub as an id.
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def check(name: str) -> str:
    """``name`` unchanged when it is servable as given; ModelError (one line) otherwise."""
    if not name or not name.strip():
        raise ModelError("empty model name (--kiln-model / $KILN_MODEL)")
    if name in LOCAL_MODELS:
        return name
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / _MODEL_DIR_MARKER).is_file():
            raise ModelError(f"model directory {name} has no {_MODEL_DIR_MARKER}: "
                             "not a Hugging Face model folder")
        return name
    if _looks_like_path(name) or path.exists():
        raise ModelError(f"model directory {name} does not exist (or is not a directory)")
    return name  # a hub id: the engine resolves it


def resolve(name: str) -> tuple[str, tuple[str, ...]]:
    """(reference for the engine's --model, args that make the API answer to ``name``).

    Local models and directories are served under the name the tests use, so
    requests name the model the same way whatever it resolves to.
    """
    check(name)
    if name in LOCAL_MODELS:
        from ci import tinymodel  # imported lazily: it pulls numpy/tokenizers in
        return str(tinymodel.ensure_tiny_model()), ("--served-model-name", name)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve()), ("--served-model-name", name)
    return name, ()


def from_env() -> str | None:
    """The model ``$KILN_MODEL`` names, or None."""
    return os.environ.get(MODEL_ENV) or None
