"""invoke tasks that run nox say so in one line when nox is missing, with the fix (pyinvoke's habit)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INVOKE_TIMEOUT_S = 60  # importing tasks.py and checking PATH: ~1 s


@pytest.mark.parametrize("task", [["warmup", "--profile", "cpu"], ["calibrate", "--profile", "cpu"]])
def test_a_missing_nox_is_one_line_naming_the_install(tmp_path, task):
    # A PATH with no nox on it (a GPU machine's staged tools once lost their scripts: the
    # warmup then died "exit 127" with no word on why).
    env = {**os.environ, "PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "invoke", *task], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=INVOKE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 127
    assert done.stderr.strip() == (f"{task[0]}: no `nox` on PATH -- install the task tools: "
                                   "python3 -m pip install -r requirements/tasks.txt")
