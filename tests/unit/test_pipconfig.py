"""ci.install.pipconfig: pip's settings carried to uv; package sources probed on 127.0.0.1 only."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from http.server import BaseHTTPRequestHandler

import pytest

from ci.install import pipconfig
from tests import requires
from tests.localhttp import closed_port, serving



def test_pip_config_precedence_env_over_install_over_global(tmp_path):
    requires.module("pip")  # in requirements/tests.txt: uv-built venvs have none of their own
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nfind-links = /srv/wheels\nextra-index-url = file:///a file:///b\n"
                    "timeout = 30\n[install]\ntimeout = 60\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=str(conf), PIP_FIND_LINKS="/env/wheels")
    got = pipconfig.read_pip_config(sys.executable, env)
    assert got["find-links"] == "/env/wheels"
    assert got["timeout"] == "60"
    assert got["extra-index-url"] == "file:///a file:///b"


def test_an_interpreter_without_pip_gives_no_settings(tmp_path):
    assert pipconfig.read_pip_config(str(tmp_path / "no-python")) == {}


def test_uv_env_translates_sources_and_keeps_pip_s_index_rule():
    pip = {"find-links": "/opt/wheels /srv/more", "extra-index-url": "file:///a  file:///b",
           "constraint": "/etc/c.txt", "cert": "/etc/ca.pem", "default-timeout": "180",
           "disable-pip-version-check": "1"}
    assert pipconfig.uv_env(pip) == {
        "UV_FIND_LINKS": "/opt/wheels,/srv/more",  # uv splits this one on commas
        "UV_EXTRA_INDEX_URL": "file:///a file:///b",
        "UV_INDEX_STRATEGY": "unsafe-best-match",
        "UV_CONSTRAINT": "/etc/c.txt",
        "SSL_CERT_FILE": "/etc/ca.pem",
        "UV_HTTP_TIMEOUT": "180",
    }
    lock_env = pipconfig.uv_env(pip, pipconfig.LOCK_INSTALL_KEYS)
    assert "UV_CONSTRAINT" not in lock_env and lock_env["UV_FIND_LINKS"] == "/opt/wheels,/srv/more"
    assert pipconfig.uv_env({"find-links": "/w"}) == {"UV_FIND_LINKS": "/w"}  # one index: uv's default rule


@pytest.fixture
def http_status():
    """Base URL of a 127.0.0.1 server answering every request with the given status."""
    stack = contextlib.ExitStack()

    def start(status: int) -> str:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return stack.enter_context(serving(Handler)) + "/whl/cpu/torch/"

    with stack:
        yield start


def test_answers_200_and_404_but_not_5xx_or_refused(http_status, tmp_path):
    assert pipconfig.answers(http_status(200)) is None
    assert pipconfig.answers(http_status(404)) is None  # the host is there; pip/uv will say the rest
    assert pipconfig.answers(http_status(503)) == "HTTP 503"
    t0 = time.monotonic()
    why = pipconfig.answers(f"http://127.0.0.1:{closed_port()}/x/")
    assert why.startswith("unreachable (") and time.monotonic() - t0 < pipconfig.PROBE_TIMEOUT_S
    assert pipconfig.answers(str(tmp_path)) is None
    assert pipconfig.answers(f"file://{tmp_path / 'gone'}") == "no such path"
