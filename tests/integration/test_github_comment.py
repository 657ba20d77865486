"""The sticky PR comment against a local GitHub stand-in on 127.0.0.1 that records requests.

GitHub itself is out of reach from CI; this server speaks the slice of the REST
API kiln uses (list/create/edit issue comments, pagination, auth, errors).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from ci.report import github, render as report
from ci.report.github import MARKER, GitHub, GitHubError
from tests.localhttp import closed_port, serving

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "junit"
INVOKE_TIMEOUT_S = 60  # importing tasks.py and two requests to 127.0.0.1: ~1 s
BOT_TOKEN = "ghs_" + "b0tT0ken" * 5
READONLY_TOKEN = "ghs_" + "r3adOnly" * 5
REPO = "kiln-org/engine"
PR = 42


class FakeGitHub:
    """State and request log of the stand-in API."""

    def __init__(self):
        self.comments: dict[int, list[dict]] = {}
        self.requests: list[dict] = []
        self.next_id = 1000
        self.lock = threading.Lock()

    def add(self, pr: int, body: str, login: str) -> dict:
        with self.lock:
            self.next_id += 1
            comment = {"id": self.next_id, "body": body, "user": {"login": login, "type": "Bot"}}
            self.comments.setdefault(pr, []).append(comment)
            return comment


def make_handler(state: FakeGitHub):
    logins = {BOT_TOKEN: "github-actions[bot]", READONLY_TOKEN: "github-actions[bot]"}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _reply(self, status: int, payload) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            auth = self.headers.get("Authorization", "")
            state.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query),
                                   "auth": auth, "body": body})
            token = auth.removeprefix("Bearer ")
            if token not in logins:
                return self._reply(401, {"message": "Bad credentials"})
            parts = url.path.strip("/").split("/")
            if parts[:3] != ["repos", *REPO.split("/")]:
                return self._reply(404, {"message": "Not Found"})
            if method == "GET" and parts[3] == "issues" and parts[5] == "comments":
                per_page = int(parse_qs(url.query)["per_page"][0])
                page = int(parse_qs(url.query)["page"][0])
                items = state.comments.get(int(parts[4]), [])
                return self._reply(200, items[(page - 1) * per_page: page * per_page])
            if token == READONLY_TOKEN:
                return self._reply(403, {"message": "Resource not accessible by integration"})
            if method == "POST" and parts[3] == "issues" and parts[5] == "comments":
                return self._reply(201, state.add(int(parts[4]), body["body"], logins[token]))
            if method == "PATCH" and parts[3:5] == ["issues", "comments"]:
                for comments in state.comments.values():
                    for comment in comments:
                        if comment["id"] == int(parts[5]):
                            comment["body"] = body["body"]
                            return self._reply(200, comment)
                return self._reply(404, {"message": "Not Found"})
            return self._reply(404, {"message": "Not Found"})

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PATCH(self):
            self._handle("PATCH")

    return Handler


@pytest.fixture
def api():
    """(state, base URL) of a stand-in GitHub on 127.0.0.1, shut down afterwards."""
    state = FakeGitHub()
    with serving(make_handler(state)) as base:
        yield state, base


def env_for(base: str, token: str = BOT_TOKEN, **extra) -> dict:
    return {"GITHUB_TOKEN": token, "GITHUB_API_URL": base, "GITHUB_REPOSITORY": REPO, **extra}


def test_created_once_then_edited_in_place(api):
    state, base = api
    first = report.build_report(FIXTURES / "params.xml", "e2e-h100-4", env={})
    assert github.post_report(first, "e2e-h100-4", pr=PR, env=env_for(base)) == ("created", 1001)
    second = report.build_report(FIXTURES / "all_passed.xml", "e2e-h100-4", env={})
    assert github.post_report(second, "e2e-h100-4", pr=PR, env=env_for(base)) == ("updated", 1001)
    (comment,) = state.comments[PR]
    assert comment["body"].startswith(f"{MARKER}\n<!-- kiln-report:e2e-h100-4 -->\n### ✅")
    assert [(r["method"], r["path"]) for r in state.requests] == [
        ("GET", f"/repos/{REPO}/issues/{PR}/comments"), ("POST", f"/repos/{REPO}/issues/{PR}/comments"),
        ("GET", f"/repos/{REPO}/issues/{PR}/comments"), ("PATCH", f"/repos/{REPO}/issues/comments/1001")]
    assert all(r["auth"] == f"Bearer {BOT_TOKEN}" for r in state.requests)
    # Same body again: nothing to edit.
    assert github.post_report(second, "e2e-h100-4", pr=PR, env=env_for(base)) == ("unchanged", 1001)
    assert state.requests[-1]["method"] == "GET"


def test_finds_its_comment_on_a_later_page(api):
    state, base = api
    for i in range(140):
        state.add(PR, f"lgtm {i}", "reviewer")
    state.add(PR, f"{MARKER}\n<!-- kiln-report:e2e-mi300-8 -->\nold", "github-actions[bot]")
    for i in range(20):
        state.add(PR, f"more {i}", "reviewer")
    outcome, comment_id = github.post_report("new", "e2e-mi300-8", pr=PR, env=env_for(base))
    assert (outcome, comment_id) == ("updated", 1141)
    pages = [r["query"]["page"] for r in state.requests if r["method"] == "GET"]
    assert pages == [["1"], ["2"]]
    assert state.requests[0]["query"]["per_page"] == [str(github.PAGE_SIZE)]


def test_sessions_keep_separate_comments(api):
    state, base = api
    github.post_report("h100 report", "e2e-h100-4", pr=PR, env=env_for(base))
    github.post_report("mi300 report", "e2e-mi300-8", pr=PR, env=env_for(base))
    github.post_report("h100 again", "e2e-h100-4", pr=PR, env=env_for(base))
    bodies = [c["body"].split("\n", 2)[2] for c in state.comments[PR]]
    assert bodies == ["h100 again", "mi300 report"]


def test_a_users_comment_with_the_marker_is_never_edited(api):
    state, base = api
    planted = state.add(PR, f"{MARKER}\n<!-- kiln-report:e2e-h100-4 -->\nmine", "mallory")
    assert github.post_report("report", "e2e-h100-4", pr=PR, env=env_for(base))[0] == "created"
    assert planted["body"].endswith("mine")
    assert len(state.comments[PR]) == 2


def test_green_run_updates_but_never_opens_a_comment(api):
    state, base = api
    assert github.post_report("green", "e2e-cpu", pr=PR, env=env_for(base), create=False) == ("skipped", None)
    assert PR not in state.comments and [r["method"] for r in state.requests] == ["GET"]
    github.post_report("red", "e2e-cpu", pr=PR, env=env_for(base))
    assert github.post_report("green", "e2e-cpu", pr=PR, env=env_for(base), create=False)[0] == "updated"
    assert state.comments[PR][0]["body"].endswith("green")


def test_forbidden_token_fails_clearly_and_never_shows_the_token(api, caplog):
    state, base = api
    caplog.set_level(logging.DEBUG)
    with pytest.raises(GitHubError) as err:
        github.post_report("report", "e2e-cpu", pr=PR, env=env_for(base, token=READONLY_TOKEN))
    message = str(err.value)
    assert "HTTP 403 Resource not accessible by integration" in message
    assert READONLY_TOKEN not in message and READONLY_TOKEN not in caplog.text
    client = GitHub(READONLY_TOKEN, REPO, base)
    assert READONLY_TOKEN not in repr(client)


def test_bad_token_is_401(api):
    _, base = api
    with pytest.raises(GitHubError, match="HTTP 401 Bad credentials"):
        github.post_report("r", "e2e-cpu", pr=PR, env=env_for(base, token="nope"))


@pytest.mark.parametrize("env,message", [
    ({"GITHUB_REPOSITORY": REPO}, "GITHUB_TOKEN is empty"),
    ({"GITHUB_TOKEN": BOT_TOKEN}, "repository must be owner/name"),
    ({"GITHUB_TOKEN": BOT_TOKEN, "GITHUB_REPOSITORY": REPO, "GITHUB_API_URL": "http://example.com"},
     "refusing to send a token to http://example.com"),
])
def test_inputs_are_checked_before_any_request(env, message):
    with pytest.raises(GitHubError, match=message):
        github.post_report("r", "e2e-cpu", pr=PR, env=env)


def test_pr_number_from_the_event_payload(api, tmp_path):
    state, base = api
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"pull_request": {"number": 7}}))
    github.post_report("r", "e2e-cpu", env=env_for(base, GITHUB_EVENT_PATH=str(event)))
    assert 7 in state.comments
    event.write_text(json.dumps({"schedule": "0 3 * * *"}))
    with pytest.raises(GitHubError, match="no pull request"):
        github.post_report("r", "e2e-cpu", env=env_for(base, GITHUB_EVENT_PATH=str(event)))


def test_oversized_body_is_refused_locally(api):
    state, base = api
    with pytest.raises(GitHubError, match="GitHub allows 65536"):
        github.post_report("x" * 70_000, "e2e-cpu", pr=PR, env=env_for(base))
    assert state.requests == []


def test_unreachable_api_is_one_clear_line():
    port = closed_port()
    with pytest.raises(GitHubError, match=r"GET /repos/kiln-org/engine/issues/42/comments: ConnectionError"):
        github.post_report("r", "e2e-cpu", pr=PR, env=env_for(f"http://127.0.0.1:{port}"))


def test_the_matrix_report_is_posted_as_one_sticky_comment_by_invoke_comment(api, tmp_path):
    # `invoke merge` wrote the matrix's report; the report job posts that file, as is, once, then edits it.
    state, base = api
    md = tmp_path / "report-e2e-matrix.md"

    def post(*extra):
        return subprocess.run([sys.executable, "-m", "invoke", "comment", "--markdown", str(md), "--session",
                               "e2e-matrix", "--pr", str(PR), "--repo", REPO, *extra], cwd=ROOT,
                              env={**os.environ, **env_for(base)}, capture_output=True, text=True,
                              timeout=INVOKE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)

    md.write_text("## ✅ kiln e2e matrix: all 3 shards reported, every test passed\n")
    done = post("--update-only")
    assert done.returncode == 0 and "sticky comment for e2e-matrix: skipped" in done.stdout  # green opens none
    md.write_text("## ❌ kiln e2e matrix: 1 of 3 shards missing — not green\n")
    assert "created" in post().stdout
    md.write_text("## ✅ kiln e2e matrix: all 3 shards reported, every test passed\n")
    assert "updated" in post("--update-only").stdout
    (comment,) = state.comments[PR]
    assert comment["body"] == f"{MARKER}\n{github.session_marker('e2e-matrix')}\n{md.read_text()}"
    assert BOT_TOKEN not in done.stdout + done.stderr
    missing = subprocess.run([sys.executable, "-m", "invoke", "comment", "--markdown", str(tmp_path / "none.md"),
                              "--session", "e2e-matrix", "--pr", "1"], cwd=ROOT, capture_output=True, text=True,
                             timeout=INVOKE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert missing.returncode == 1 and missing.stderr.strip().startswith(f"comment: cannot read {tmp_path / 'none.md'}")
