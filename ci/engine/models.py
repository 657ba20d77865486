"""Which model a run serves: a hub id, a local directory, or one of kiln's own local models.

``--kiln-model NAME_OR_PATH`` (or ``$KILN_MODEL``) replaces the profile's
default model for every test that does not name one (ci/session/pytest_plugin.py).
GPU profiles default to a hub model; air-gapped runners and the device machine
reach no hub, so they point the same suites at a directory or at one of kiln's
local models (``tiny-llama``, ci/engine/tinymodel.py; ``smollm2-135m``, ci/engine/realmodel.py).

``python -m ci.engine.models NAME`` builds (or reuses) a local model and
prints its directory, for ``$(...)`` in a shell.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

log = logging.getLogger(__name__)

MODEL_ENV = "KILN_MODEL"
# Names of local models kiln builds itself (no model hub on CI machines): the
# tiny random one (ci/engine/tinymodel.py) and a real one converted from a wheel on
# the package index (ci/engine/realmodel.py).
TINY_MODEL = "tiny-llama"
REAL_MODEL = "smollm2-135m"
LOCAL_MODELS = (TINY_MODEL, REAL_MODEL)
# Runner vendors each local model's tests run on. The real model's bounds (the
# reference kit's logprob tolerance, the HellaSwag floor) were measured on the
# cpu lane; on NVIDIA they are estimates until `invoke calibrate` measures them
# there (ci/kits/thresholds.py: estimates report "uncalibrated", never fail). AMD:
# no AMD GPU has run it. The tiny model serves everywhere.
_LANES = {REAL_MODEL: ("cpu", "nvidia")}
# Lanes whose runners reach no package index (the GPU machines kiln verifies on):
# a model fetched from the index runs there only when already staged on the runner
# (ci/engine/realmodel.py: offline_unavailable). The cpu lane fetches it.
_OFFLINE_LANES = {REAL_MODEL: ("nvidia",)}
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


def resolve(name: str) -> tuple[str, str | None]:
    """(reference for the engine's --model, the name the API must answer to, or None when the same).

    Local models and directories are served under the name the tests use, so
    requests name the model the same way whatever it resolves to.
    """
    check(name)
    if name in LOCAL_MODELS:
        return str(ensure_local(name)), name
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve()), name
    return name, None


class LaneCheck(NamedTuple):
    """Why a local model's tests do not run on a runner. ``missing``: a prerequisite this
    runner lacks (not staged), which fails under CI instead of skipping; else a lane rule."""

    reason: str
    missing: bool = False


def lane_check(name: str, vendor: str, cache_dir: Path | None = None) -> LaneCheck | None:
    """Why tests that ask for local model ``name`` do not run on a ``vendor`` runner, or None."""
    lanes = _LANES.get(name)
    if lanes is None:
        return None
    if vendor not in lanes:
        return LaneCheck(f"{name} runs on the {'/'.join(lanes)} lanes only: its bounds are measured "
                         f"or estimated there (ci/engine/models.py)")
    if vendor in _OFFLINE_LANES.get(name, ()):
        from ci.engine import realmodel  # noqa: PLC0415  (imported lazily, as ensure_local does)
        why = realmodel.offline_unavailable(cache_dir)
        if why:
            return LaneCheck(f"not staged: {why}", missing=True)
    return None


def lane_skip_reason(name: str, vendor: str) -> str | None:
    """Why local model ``name`` never runs on a ``vendor`` runner (the lane rule alone), or None."""
    lanes = _LANES.get(name)
    if lanes is None or vendor in lanes:
        return None
    return lane_check(name, vendor).reason


def from_env() -> str | None:
    """The model ``$KILN_MODEL`` names, or None."""
    return os.environ.get(MODEL_ENV) or None


def ensure_local(name: str, cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """The directory of local model ``name``, built (tiny) or fetched and converted (real) first if needed."""
    if name == TINY_MODEL:
        from ci.engine import tinymodel  # imported lazily: it pulls numpy/tokenizers in
        return tinymodel.ensure_tiny_model(cache_dir, seed=seed)
    if name == REAL_MODEL:
        from ci.engine import realmodel  # imported lazily: a build pulls torch/transformers in
        return realmodel.ensure_real_model(cache_dir)
    raise ModelError(f"{name!r} is not one of kiln's local models ({', '.join(LOCAL_MODELS)})")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build (or reuse) one of kiln's local models and print its directory."""
    parser = argparse.ArgumentParser(prog="python -m ci.engine.models", description=main.__doc__)
    parser.add_argument("model", choices=LOCAL_MODELS)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="kiln cache root (default: $KILN_CACHE_DIR or <repo>/.kiln/cache)")
    parser.add_argument("--seed", type=int, default=0, help=f"{TINY_MODEL} only: weight seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = ensure_local(args.model, args.cache_dir, seed=args.seed)
    except (ValueError, RuntimeError, OSError) as e:
        log.error("%s", e)
        return 1
    # Deliberate CLI output: the path alone on stdout, for `$(python -m ci.engine.models NAME)`.
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
