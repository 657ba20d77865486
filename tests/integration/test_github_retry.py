"""The GitHub client retries 5xx and rate limits with backoff, against a scripted server on 127.0.0.1.

GitHub is out of reach from CI; this server answers each request with the next
status of a script (then 200), and records what it was asked.
"""
from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler

import pytest

from ci.report import github
from ci.report.github import GitHub, GitHubError
from tests.localhttp import serving

TOKEN = "ghs_" + "r3tryT0k" * 5
REPO = "kiln-org/engine"
PR = 7
FAST_BACKOFF_S = 0.01  # the real 2 s backoff would only slow the test down


class Script:
    """Statuses to answer, in order (with headers), then 200; every request recorded."""

    def __init__(self, *answers: tuple[int, dict]):
        self.answers = list(answers)
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def next(self, method: str, path: str) -> tuple[int, dict]:
        with self.lock:
            self.seen.append((method, path))
            return self.answers.pop(0) if self.answers else (200, {})


@pytest.fixture
def serve():
    stack = contextlib.ExitStack()

    def start(script: Script) -> str:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status, headers = script.next(self.command, self.path.split("?")[0])
                ok = self.command == "GET" and status == 200
                data = json.dumps([] if ok else {"id": 1, "message": f"scripted {status}"}).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _answer

        return stack.enter_context(serving(Handler))

    with stack:
        yield start


def client(base: str) -> GitHub:
    return GitHub(TOKEN, REPO, base, http=github.retrying_session(backoff_s=FAST_BACKOFF_S, jitter_s=0.0))


COMMENTS = f"/repos/{REPO}/issues/{PR}/comments"


def test_a_502_then_200_is_retried_and_succeeds(serve):
    script = Script((502, {}))
    assert client(serve(script)).find_comment(PR, "e2e-cpu") is None
    assert script.seen == [("GET", COMMENTS), ("GET", COMMENTS)]


def test_5xx_every_time_gives_up_after_the_retries_naming_the_status(serve):
    script = Script(*[(503, {})] * (github.RETRIES + 5))
    with pytest.raises(GitHubError, match=r"GET .*: HTTP 503 scripted 503"):
        client(serve(script)).find_comment(PR, "e2e-cpu")
    assert len(script.seen) == 1 + github.RETRIES


def test_rate_limits_are_retried_after_the_wait_github_asks_for(serve):
    script = Script((429, {"Retry-After": "0"}), (403, {"Retry-After": "0"}))
    assert client(serve(script)).find_comment(PR, "e2e-cpu") is None
    assert len(script.seen) == 3


def test_a_plain_403_is_an_answer_not_a_rate_limit(serve):
    script = Script((403, {}))
    with pytest.raises(GitHubError, match="HTTP 403"):
        client(serve(script)).find_comment(PR, "e2e-cpu")
    assert len(script.seen) == 1


def test_a_post_is_never_resent_after_an_answer(serve):
    # The first GET finds no comment; the POST's 502 may come after GitHub made it.
    script = Script((200, {}), (502, {}))
    with pytest.raises(GitHubError, match="POST .*HTTP 502"):
        client(serve(script)).upsert_comment(PR, "report", "e2e-cpu")
    assert [m for m, _ in script.seen] == ["GET", "POST"]


def test_the_default_client_retries():
    adapter = GitHub(TOKEN, REPO)._http.get_adapter(github.DEFAULT_API_URL)
    assert adapter.max_retries.total == github.RETRIES
    assert 502 in adapter.max_retries.status_forcelist
