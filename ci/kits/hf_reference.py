"""HF transformers as the reference decoder for the reference kit (ci/kits/reference.py).

Loads a local model directory with ``AutoModelForCausalLM`` in the dtype the
engine serves (float32, or bfloat16 against a bfloat16 server) on the device
the engine runs on (``select_device``: the GPU on NVIDIA/AMD lanes, the CPU on
the cpu lane), and decodes greedily with its own KV cache, one token at a
time, reporting each position's top-k log-probabilities the way an
OpenAI-compatible engine does: token strings are the single-token decodes
(``" Paris"``), prompts are tokenized with the tokenizer's default special
tokens (as engines do for ``/v1/completions``).

On a GPU the reference must not run inside the test process: its CUDA context
(~600 MiB on an H200) would stay for the life of the process, and the pool's
release check after every server stop (ci/host/gpumem.py: baseline + 256 MiB)
would then blame the engine for it and refuse the GPU. So
:class:`HFReferenceProcess` runs the decodes in a child (``python -m
ci.kits.hf_reference``) that sees exactly the server's devices
(ci.host.gpu.child_env) and takes its memory with it when it exits; the cpu lane
uses the same path, so the one code path is the one the cpu run exercises.

torch and transformers are imported in the child only: the e2e environment
has them (vLLM depends on both); kiln's own test environment does not need them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from ci.host import gpu
from ci.kits.client import KitFailure
from ci.kits.reference import DTYPES, Decode, Step

log = logging.getLogger(__name__)

CPU = "cpu"
CUDA = "cuda"
# Lanes whose engine runs on a GPU torch addresses as "cuda" (ROCm builds too).
GPU_VENDORS = ("nvidia", "amd")
# The child loads a 135M model (seconds) and decodes 5 prompts x 24 tokens with
# top-k (seconds on a GPU, tens of seconds on one CPU thread of a loaded 2-core
# runner); 240 s ends a hung child inside the cpu lane's 300 s test timeout, so
# the test fails naming the child, not the timeout plugin.
REFERENCE_TIMEOUT_S = 240.0
# Lines of the child's stderr quoted when it fails: its traceback ends there.
STDERR_TAIL_LINES = 5
_REPO = Path(__file__).resolve().parents[2]


class HFReferenceError(RuntimeError):
    """The reference cannot run as asked; one line naming the cause."""


def select_device(vendor: str, cuda_available: bool) -> str:
    """``"cuda"`` on a GPU lane (the engine's device), ``"cpu"`` on the cpu lane.

    A GPU lane whose torch sees no GPU is an error, not a fallback: a float32 CPU
    reference against a GPU engine compares two devices' rounding, not one
    engine against an independent implementation on the same hardware.
    """
    if vendor not in GPU_VENDORS:
        return CPU
    if not cuda_available:
        raise HFReferenceError(f"the HF reference must run on the server's GPU ({vendor} lane), but torch "
                               "sees no GPU in this interpreter (torch.cuda.is_available() is False)")
    return CUDA


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise HFReferenceError(f"no HF reference in dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return dtype


class HFReference:
    """Greedy decoding with HF transformers on ``device`` in ``dtype``, in this process."""

    def __init__(self, model_dir: Path | str, *, device: str = CPU, dtype: str = "float32",
                 threads: int | None = None):
        import torch  # noqa: PLC0415  (heavy; only the e2e environment has it)
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=getattr(torch, _check_dtype(dtype))).to(device)
        self.model.eval()

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def greedy(self, prompt: str, n_tokens: int, top_k: int) -> Decode:
        """Temperature-0 decode of ``n_tokens`` (EOS ignored) with top-k logprobs per step."""
        torch = self._torch
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)
        steps, past = [], None
        with torch.no_grad():
            for _ in range(n_tokens):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                # log_softmax in float32 whatever the model's dtype, as engines report logprobs.
                logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                values, indices = torch.topk(logprobs, top_k)
                top: dict[str, float] = {}
                for v, i in zip(values.tolist(), indices.tolist()):
                    # Two ids may decode to one string; keep the likelier, as a dict does.
                    top.setdefault(self._piece(i), v)
                chosen = int(indices[0])
                steps.append(Step(self._piece(chosen), float(values[0]), top))
                ids = torch.tensor([[chosen]], device=self.device)
        return Decode(prompt, tuple(steps))

    def greedy_all(self, prompts: Sequence[str], n_tokens: int, top_k: int) -> list[Decode]:
        """:meth:`greedy` of every prompt."""
        return [self.greedy(p, n_tokens, top_k) for p in prompts]


def _to_json(decodes: Sequence[Decode]) -> list[dict]:
    return [{"prompt": d.prompt, "steps": [[s.token, s.logprob, s.top] for s in d.steps]} for d in decodes]


def _from_json(raw: list[dict]) -> list[Decode]:
    return [Decode(d["prompt"], tuple(Step(t, float(lp), {str(k): float(v) for k, v in top.items()})
                                      for t, lp, top in d["steps"])) for d in raw]


class HFReferenceProcess:
    """:class:`HFReference` in a child process on the server's devices (module docstring: why)."""

    def __init__(self, model_dir: Path | str, *, vendor: str, devices: Sequence[int] = (),
                 dtype: str = "float32", threads: int | None = None, python: str = sys.executable,
                 timeout_s: float = REFERENCE_TIMEOUT_S, environ: Mapping[str, str] | None = None):
        self.model_dir = Path(model_dir)
        self.vendor = vendor
        self.dtype = _check_dtype(dtype)
        self.threads = threads
        self.python = python
        self.timeout_s = timeout_s
        base = dict(os.environ if environ is None else environ)
        # The child sees exactly the server's GPUs (none asked: what this process sees).
        self.env = gpu.child_env(base, vendor, devices) if devices else base

    def command(self, request: Path, out: Path) -> list[str]:
        """The child's command line (``python -m ci.kits.hf_reference ...``)."""
        return [self.python, "-m", "ci.kits.hf_reference", "--model-dir", str(self.model_dir),
                "--vendor", self.vendor, "--dtype", self.dtype, "--request", str(request),
                "--out", str(out), *(["--threads", str(self.threads)] if self.threads else [])]

    def greedy_all(self, prompts: Sequence[str], n_tokens: int, top_k: int) -> list[Decode]:
        """Every prompt's reference decode, from one child (one model load)."""
        with tempfile.TemporaryDirectory(prefix="kiln-hfref-") as tmp:
            request, out = Path(tmp) / "request.json", Path(tmp) / "out.json"
            request.write_text(json.dumps({"prompts": list(prompts), "n_tokens": n_tokens, "top_k": top_k}))
            cmd = self.command(request, out)
            try:
                done = subprocess.run(cmd, cwd=_REPO, env=self.env, capture_output=True, text=True,
                                      timeout=self.timeout_s, check=False)
            except subprocess.TimeoutExpired:
                raise KitFailure(f"HF reference ({self.dtype}, {self.vendor}) took over "
                                 f"{self.timeout_s:.0f} s; killed") from None
            if done.returncode != 0 or not out.is_file():
                tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-STDERR_TAIL_LINES:])
                raise KitFailure(f"HF reference ({self.dtype}, {self.vendor}) exited {done.returncode}: {tail}")
            return _from_json(json.loads(out.read_text()))

    def greedy(self, prompt: str, n_tokens: int, top_k: int) -> Decode:
        """One prompt's reference decode (a child of its own: prefer :meth:`greedy_all`)."""
        return self.greedy_all([prompt], n_tokens, top_k)[0]


def main(argv: Sequence[str] | None = None) -> int:
    """The child: decode the request's prompts with HF on the lane's device; write JSON to --out."""
    ap = argparse.ArgumentParser(prog="python -m ci.kits.hf_reference", description=main.__doc__)
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--vendor", required=True, help="the lane's GPU vendor (cpu, nvidia, amd)")
    ap.add_argument("--dtype", required=True, choices=DTYPES)
    ap.add_argument("--request", required=True, type=Path, help="JSON: prompts, n_tokens, top_k")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch  # noqa: PLC0415

    try:
        device = select_device(a.vendor, torch.cuda.is_available())
    except HFReferenceError as exc:
        log.error("%s", exc)
        return 1
    req = json.loads(a.request.read_text())
    ref = HFReference(a.model_dir, device=device, dtype=a.dtype, threads=a.threads)
    log.info("HF reference: %s on %s in %s", a.model_dir.name, device, a.dtype)
    decodes = ref.greedy_all(req["prompts"], int(req["n_tokens"]), int(req["top_k"]))
    a.out.write_text(json.dumps(_to_json(decodes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
