"""The HF reference's device and dtype choice, and its child process (no torch needed here)."""
from __future__ import annotations

import json
import stat
import sys
import textwrap

import pytest

from ci.kits import hf_reference
from ci.kits.client import KitFailure
from ci.kits.hf_reference import HFReferenceError, HFReferenceProcess, select_device


def test_the_reference_runs_on_the_gpu_on_gpu_lanes_and_on_the_cpu_lane_on_cpu():
    assert select_device("nvidia", cuda_available=True) == "cuda"
    assert select_device("amd", cuda_available=True) == "cuda"  # ROCm torch answers to "cuda"
    assert select_device("cpu", cuda_available=True) == "cpu"  # a dev box's GPU is not the cpu lane's
    assert select_device("cpu", cuda_available=False) == "cpu"


def test_a_gpu_lane_whose_torch_sees_no_gpu_is_an_error_not_a_cpu_fallback():
    with pytest.raises(HFReferenceError, match=r"^the HF reference must run on the server's GPU \(nvidia lane\), "
                                               r"but torch sees no GPU"):
        select_device("nvidia", cuda_available=False)


def test_the_dtype_is_checked_before_anything_starts():
    with pytest.raises(HFReferenceError, match="no HF reference in dtype 'float16'; known: float32, bfloat16"):
        HFReferenceProcess("/m", vendor="nvidia", dtype="float16")


def test_the_child_sees_exactly_the_servers_gpu_and_is_told_the_lane_and_dtype(tmp_path):
    ref = HFReferenceProcess("/models/smollm2-135m", vendor="nvidia", devices=(3,), dtype="bfloat16",
                             environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3", "PATH": "/bin"})
    assert ref.env["CUDA_VISIBLE_DEVICES"] == "3" and ref.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    cmd = ref.command(tmp_path / "req.json", tmp_path / "out.json")
    assert cmd[1:3] == ["-m", "ci.kits.hf_reference"]
    assert cmd[cmd.index("--vendor") + 1] == "nvidia" and cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert "--threads" not in cmd
    cpu = HFReferenceProcess("/m", vendor="cpu", threads=1, environ={"PATH": "/bin"})
    assert cpu.env == {"PATH": "/bin"}  # no devices asked: the environment as it is
    assert cpu.command(tmp_path / "r", tmp_path / "o")[-2:] == ["--threads", "1"]


def _fake_python(tmp_path, body: str):
    """An executable standing in for ``python -m ci.kits.hf_reference``: ``body`` runs with ``args``."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\nargs = sys.argv[1:]\n"
                      + textwrap.dedent(body))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_every_prompt_comes_back_from_one_child_as_decodes(tmp_path):
    python = _fake_python(tmp_path, """
        req = json.load(open(args[args.index("--request") + 1]))
        out = [{"prompt": p, "steps": [[" Paris", -0.1, {" Paris": -0.1, " Lyon": -3.2}]] * req["n_tokens"]}
               for p in req["prompts"]]
        open(args[args.index("--out") + 1], "w").write(json.dumps(out))
        with open(os.environ["CALLS"], "a") as f:
            f.write("call\\n")
    """)
    calls = tmp_path / "calls"
    ref = HFReferenceProcess("/m", vendor="cpu", python=python, environ={"CALLS": str(calls)})
    decodes = ref.greedy_all(["a", "b"], 2, 2)
    assert [d.prompt for d in decodes] == ["a", "b"]
    assert decodes[1].text == " Paris Paris" and decodes[0].steps[0].top == {" Paris": -0.1, " Lyon": -3.2}
    assert calls.read_text() == "call\n"  # one model load for all prompts


def test_a_failing_child_is_one_line_with_the_end_of_its_stderr(tmp_path):
    python = _fake_python(tmp_path, """
        sys.stderr.write("Traceback (most recent call last):\\n  ...\\ntorch.OutOfMemoryError: CUDA out of memory\\n")
        sys.exit(1)
    """)
    ref = HFReferenceProcess("/m", vendor="nvidia", python=python, environ={})
    with pytest.raises(KitFailure) as info:
        ref.greedy("a", 2, 2)
    msg = str(info.value)
    assert msg.startswith("HF reference (float32, nvidia) exited 1: ") and "\n" not in msg
    assert msg.endswith("torch.OutOfMemoryError: CUDA out of memory")


def test_a_hung_child_is_killed_at_its_deadline(tmp_path):
    python = _fake_python(tmp_path, """
        import threading
        threading.Event().wait(30)
    """)
    ref = HFReferenceProcess("/m", vendor="cpu", python=python, environ={}, timeout_s=1.0)
    with pytest.raises(KitFailure, match=r"^HF reference \(float32, cpu\) took over 1 s; killed$"):
        ref.greedy("a", 2, 2)


def test_the_child_refuses_a_gpu_lane_without_a_gpu_in_one_logged_line(monkeypatch, tmp_path, caplog):
    fake_torch = type(sys)("torch")
    fake_torch.cuda = type("cuda", (), {"is_available": staticmethod(lambda: False)})
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"prompts": ["a"], "n_tokens": 1, "top_k": 1}))
    code = hf_reference.main(["--model-dir", "/m", "--vendor", "nvidia", "--dtype", "float32",
                              "--request", str(req), "--out", str(tmp_path / "out.json")])
    assert code == 1 and "torch sees no GPU" in caplog.text and not (tmp_path / "out.json").exists()
