"""The reference kit against a slightly wrong engine: one layer's weights off by a few percent.

    python3 bench/skewed_reference.py --profile h200-1 [--dtype float32] [--layer 15] [--skew 0.03]
    .nox/e2e-cpu/bin/python bench/skewed_reference.py --profile cpu

Run it with the interpreter that holds the engine (the GPU image's python3 after
bench/gpu_unstage.sh + bench/gpu_unstage_model.sh; on CPU the e2e-cpu venv). It
copies the converted SmolLM2 model (ci/engine/realmodel.py), multiplies one
layer's MLP output projection by ``1 + skew`` (the kind of fault a wrong kernel
or a bad weight-loading path makes: everything runs, every answer is plausible),
serves the copy as the e2e tests serve the original on ``--profile`` (its args,
its per-model args, $KILN_SERVER_ARGS, the dtype's), and runs the reference kit
against HF transformers on the *original* weights, on the server's device, with
the profile's tolerance for that dtype enforced whether measured or not: the
question is whether the bound catches this fault. Exit 1 when the kit is red
(as it must be), 0 when the skew went unnoticed.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.engine import launch, realmodel  # noqa: E402
from ci.engine.backends import get_backend  # noqa: E402
from ci.engine.server import Server  # noqa: E402
from ci.kits import reference, thresholds  # noqa: E402
from ci.kits.client import KitFailure  # noqa: E402
from ci.kits.hf_reference import HFReferenceProcess  # noqa: E402
from ci.profiles import runners  # noqa: E402

# SmolLM2-135M has 30 decoder layers: one in the middle, whose error every later layer carries.
DEFAULT_LAYER = 15
# "A few percent": small enough that greedy tokens mostly survive, so only the logprob
# comparison can see it -- the case the tolerance exists for.
DEFAULT_SKEW = 0.03
SKEWED_TENSOR = "model.layers.{layer}.mlp.down_proj.weight"
# The GPU the device machine lends (CUDA_VISIBLE_DEVICES=0 in bench/gpu_verify.sh).
GPU_DEVICES = (0,)


def skewed_copy(src: Path, dest: Path, layer: int, skew: float) -> str:
    """``src`` copied to ``dest`` with one layer's MLP output projection scaled by ``1 + skew``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(str(src / "model.safetensors"))
    name = SKEWED_TENSOR.format(layer=layer)
    if name not in weights:
        raise SystemExit(f"{name} is not in {src / 'model.safetensors'}; pick a layer the model has")
    weights[name] = weights[name] * (1.0 + skew)
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, help="runner profile (ci/profiles/runners.py), e.g. h200-1")
    ap.add_argument("--dtype", default=realmodel.FLOAT32, choices=realmodel.DTYPES)
    ap.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    ap.add_argument("--skew", type=float, default=DEFAULT_SKEW)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profile = runners.get_profile(a.profile)
    tol = thresholds.for_profile(profile.name).reference_bound(a.dtype)
    devices = GPU_DEVICES if profile.vendor != "cpu" else ()
    original = realmodel.ensure_real_model()
    with tempfile.TemporaryDirectory(prefix="kiln-skewed-") as tmp:
        tensor = skewed_copy(original, Path(tmp) / "model", a.layer, a.skew)
        args = (*profile.server_args, *profile.model_args.get(realmodel.MODEL_NAME, ()),
                *launch.server_args_from_env(), *realmodel.serve_args(a.dtype))
        server = Server(get_backend(profile.backend), str(Path(tmp) / "model"), args=args,
                        served_name=realmodel.MODEL_NAME, env=dict(profile.env), log_dir=Path(tmp) / "logs",
                        launch_timeout_s=profile.launch_timeout_s, key="bench-skewed",
                        devices=devices, vendor=profile.vendor)
        hf = HFReferenceProcess(original, vendor=profile.vendor, devices=devices, dtype=a.dtype)
        what = f"{tensor} x {1 + a.skew:g}, {a.dtype} on {profile.name}, tolerance {tol.value:g} ({tol.reason[:60]}...)"
        launch.start_watched(server)
        try:
            result = reference.check_reference(server, hf, logprob_tol=tol.value, dtype=a.dtype)
            print(f"GREEN (the skew went unnoticed): {what}\n{result.line()}")
            return 0
        except KitFailure as exc:
            print(f"RED, as it must be: {what}\n{str(exc).splitlines()[0]}")
            return 1
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
