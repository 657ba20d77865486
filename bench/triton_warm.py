"""Does a Triton cache warmed by kiln make the next launch of a torch/triton program faster?

Each round clears kiln's cache tree for one engine kind (ci.engine.caches.clear), then
launches the same small program twice as fresh processes with the
environment ci.engine.caches.engine_cache_env gives engines (TRITON_CACHE_DIR and
TORCHINDUCTOR_CACHE_DIR inside kiln's tree): the first launch compiles into
the empty cache (cold), the second finds the kernels there (warm). Printed per
round: first-call time of each @triton.jit kernel (compile + launch), of a
torch.compile'd function (Inductor -> Triton), and the whole process's wall
time; then the medians and the cold/warm ratios.

    python3 bench/triton_warm.py [--rounds 3] [--out result.json]

Needs a CUDA GPU with torch and triton (the H100/H200 machine); the parent
imports neither, the children import both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ci.engine import caches  # noqa: E402  (stdlib only: fine without kiln's test deps)

ENGINE = "vllm"  # any engine kind: the Triton/Inductor variables are common to all
# One child: torch import + three kernel compiles + one Inductor compile; a
# cold compile on an idle H100 takes well under a minute.
CHILD_TIMEOUT_S = 300.0


def child() -> dict:
    """The measured program: compile and run kernels once, report first-call times."""
    t_start = time.perf_counter()
    import torch
    import triton
    import triton.language as tl
    t_import = time.perf_counter() - t_start

    @triton.jit
    def add_relu(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        y = tl.load(y_ptr + offs, mask=mask)
        tl.store(out_ptr + offs, tl.maximum(x + y, 0.0), mask=mask)

    @triton.jit
    def row_softmax(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=-float("inf"))
        e = tl.exp(x - tl.max(x, axis=0))
        tl.store(out_ptr + row * n_cols + cols, e / tl.sum(e, axis=0), mask=cols < n_cols)

    @triton.jit
    def matmul(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pm, pn = tl.program_id(0), tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
            acc += tl.dot(a, b)
        tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float16))

    dev = torch.device("cuda")
    torch.zeros(1, device=dev)
    torch.cuda.synchronize()  # CUDA context creation is not a compile: keep it out of the figures

    def first_and_second(fn):
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times, out

    n = 1 << 20
    x, y = torch.randn(n, device=dev), torch.randn(n, device=dev)
    z = torch.empty_like(x)
    s = torch.randn(1024, 1000, device=dev)
    so = torch.empty_like(s)
    a = torch.randn(512, 512, device=dev, dtype=torch.float16)
    b = torch.randn(512, 512, device=dev, dtype=torch.float16)
    c = torch.empty(512, 512, device=dev, dtype=torch.float16)
    kernels = {
        "add_relu": (lambda: add_relu[(triton.cdiv(n, 1024),)](x, y, z, n, BLOCK=1024),
                     lambda: torch.relu(x + y), z),
        "row_softmax": (lambda: row_softmax[(1024,)](s, so, 1000, BLOCK=1024),
                        lambda: torch.softmax(s, dim=1), so),
        "matmul": (lambda: matmul[(8, 8)](a, b, c, 512, 512, 512, BM=64, BN=64, BK=32),
                   lambda: a @ b, c),
    }
    result = {"import_s": t_import, "first_s": {}, "second_s": {}}
    for name, (launch, reference, out) in kernels.items():
        (first, second), _ = first_and_second(launch)
        result["first_s"][name], result["second_s"][name] = first, second
        tol = 2e-2 if out.dtype == torch.float16 else 1e-4
        if not torch.allclose(out.float(), reference().float(), atol=tol, rtol=tol):
            raise SystemExit(f"{name}: wrong result")

    def gelu_mix(t):
        return torch.nn.functional.gelu(t) * torch.sigmoid(t) + t.sin()
    compiled = torch.compile(gelu_mix)
    (first, second), out = first_and_second(lambda: compiled(s))
    result["first_s"]["torch.compile"], result["second_s"]["torch.compile"] = first, second
    if not torch.allclose(out, gelu_mix(s), atol=1e-4, rtol=1e-4):
        raise SystemExit("torch.compile: wrong result")
    result["triton_cache_dir"] = os.environ.get("TRITON_CACHE_DIR")
    result["versions"] = {"torch": torch.__version__, "triton": triton.__version__,
                          "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}
    return result


def launch(env: dict) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    data["wall_s"] = wall
    return data


def files_under(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", type=Path, default=None, help="kiln cache root (default: a fresh temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child()))
        return 0
    with tempfile.TemporaryDirectory(prefix="kiln-triton-bench-") as tmp:
        root = args.root or Path(tmp)
        rounds = []
        for i in range(1, args.rounds + 1):
            caches.clear(root, [ENGINE])
            kiln_env = caches.engine_cache_env(ENGINE, root)
            env = {**os.environ, **kiln_env}
            cold = launch(env)
            cached_files = files_under(kiln_env["TRITON_CACHE_DIR"])
            warm = launch(env)
            assert cold["triton_cache_dir"] == warm["triton_cache_dir"] == kiln_env["TRITON_CACHE_DIR"]
            rounds.append({"cold": cold, "warm": warm, "triton_files_after_cold": cached_files})
            print(f"round {i}: triton cache {kiln_env['TRITON_CACHE_DIR']} held {cached_files} files after the cold launch")
            for name in cold["first_s"]:
                print(f"  {name:14s} first call  cold {cold['first_s'][name] * 1e3:9.1f} ms   "
                      f"warm {warm['first_s'][name] * 1e3:9.1f} ms   (steady {warm['second_s'][name] * 1e3:.3f} ms)")
            print(f"  process wall   cold {cold['wall_s']:.2f} s   warm {warm['wall_s']:.2f} s   "
                  f"(torch import {cold['import_s']:.2f} / {warm['import_s']:.2f} s)")
        med = statistics.median
        triton_names = [n for n in rounds[0]["cold"]["first_s"] if n != "torch.compile"]
        summary = {}
        for label, names in (("triton kernels (sum of first calls)", triton_names),
                             ("torch.compile first call", ["torch.compile"])):
            c = med(sum(r["cold"]["first_s"][n] for n in names) for r in rounds)
            w = med(sum(r["warm"]["first_s"][n] for n in names) for r in rounds)
            summary[label] = {"cold_s": c, "warm_s": w, "ratio": c / w}
        c, w = med(r["cold"]["wall_s"] for r in rounds), med(r["warm"]["wall_s"] for r in rounds)
        summary["whole process wall"] = {"cold_s": c, "warm_s": w, "ratio": c / w}
        print(f"\n{rounds[0]['cold']['versions']}; medians of {len(rounds)} rounds:")
        for label, f in summary.items():
            print(f"  {label:38s} cold {f['cold_s']:8.3f} s   warm {f['warm_s']:8.3f} s   {f['ratio']:5.1f}x")
        if args.out:
            args.out.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
