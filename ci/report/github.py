"""The sticky PR comment: one per pull request and session, created once, then edited.

Each GPU job of a PR posts its own report; a hidden marker (MARKER plus the
session's own marker line) finds the comment again, so a re-run edits it in
place instead of stacking comments, and two sessions never overwrite each other.
Only comments written by the expected author are edited: the workflow token may
edit anyone's comment, and a user pasting the marker must not have theirs taken over.

GitHub's REST API via requests; the token comes from the environment and goes
only into the Authorization header — never a URL, a log line or an error.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

MARKER = "<!-- kiln-report -->"
DEFAULT_API_URL = "https://api.github.com"
# Actions sets GITHUB_API_URL (it differs on GitHub Enterprise); tests point it
# at a recording server on 127.0.0.1.
API_URL_ENV = "GITHUB_API_URL"
TOKEN_ENV = "GITHUB_TOKEN"
# The author of comments made with the workflow's GITHUB_TOKEN.
BOT_LOGIN = "github-actions[bot]"
# (connect, read): a hung API must not hold a GPU runner; GitHub answers in
# well under a second normally and 30 s covers its slow days.
REQUEST_TIMEOUT_S = (5.0, 30.0)
# GitHub's largest page: the fewest requests on a busy PR.
PAGE_SIZE = 100
# 5,000 comments: far beyond any PR, and a bound so a broken server cannot loop us.
MAX_PAGES = 50
# A 502 from GitHub's front end used to turn a green job red. Retried: 5xx and
# rate limits (429; 403 only with Retry-After, GitHub's secondary limit). Four
# retries, urllib3's backoff: at once, then after 4, 8 and 16 s (+ up to 1 s
# jitter), ride out a bad half minute.
RETRIES = 4
RETRY_BACKOFF_S = 2.0
RETRY_JITTER_S = 1.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A refused or unresolvable API is seldom back within seconds: one retry covers
# a blip without holding a red job for the whole backoff.
CONNECT_RETRIES = 1
# A Retry-After longer than this is a limit that will not lift within the job's
# patience; it is waited this long at most and the last answer is reported.
MAX_RETRY_AFTER_S = 60.0
# GET lists, PATCH sets the body: both idempotent. POST is not retried on an
# answer: a 502 may come after GitHub created the comment, and a retry would
# post a second sticky comment.
RETRY_METHODS = frozenset({"GET", "PATCH"})
# GitHub rejects longer comment bodies with 422.
MAX_COMMENT_CHARS = 65_536
# Plain http would expose the token on the wire; allowed only to this machine.
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_REPO_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


class GitHubError(RuntimeError):
    """A GitHub API call failed, or the inputs for one are missing."""


def session_marker(session: str) -> str:
    """The hidden line that tells this session's comment from the others."""
    return f"<!-- kiln-report:{re.sub(r'[^A-Za-z0-9_.-]', '_', session)} -->"


def comment_body(report: str, session: str) -> str:
    """``report`` behind the two hidden marker lines."""
    return f"{MARKER}\n{session_marker(session)}\n{report}"


def _check_api_url(api_url: str) -> str:
    parts = urlsplit(api_url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        return api_url.rstrip("/")
    raise GitHubError(f"refusing to send a token to {parts.scheme}://{parts.hostname}: "
                      "https only (plain http only to this machine)")


class _GitHubRetry(Retry):
    """urllib3's Retry, plus GitHub's secondary rate limit (403 + Retry-After), waits capped."""

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        if status_code == 403 and has_retry_after and self._is_method_retryable(method):
            return bool(self.total)
        return super().is_retry(method, status_code, has_retry_after)

    def get_retry_after(self, response) -> float | None:
        after = super().get_retry_after(response)
        return None if after is None else min(after, MAX_RETRY_AFTER_S)


def retrying_session(retries: int = RETRIES, backoff_s: float = RETRY_BACKOFF_S,
                     jitter_s: float = RETRY_JITTER_S) -> requests.Session:
    """A requests Session that retries GitHub's 5xx and rate-limit answers with backoff."""
    retry = _GitHubRetry(total=retries, connect=min(retries, CONNECT_RETRIES), read=0, redirect=0, status=retries,
                         status_forcelist=RETRY_STATUSES, allowed_methods=RETRY_METHODS,
                         backoff_factor=backoff_s, backoff_jitter=jitter_s, raise_on_status=False,
                         respect_retry_after_header=True)
    http = requests.Session()
    http.mount("https://", HTTPAdapter(max_retries=retry))
    http.mount("http://", HTTPAdapter(max_retries=retry))
    return http


class GitHub:
    """A minimal GitHub REST client for issue comments on one repository."""

    def __init__(self, token: str, repo: str, api_url: str = DEFAULT_API_URL,
                 http: requests.Session | None = None):
        if not token:
            raise GitHubError(f"{TOKEN_ENV} is empty: the sticky comment needs a token "
                              "with pull-requests: write")
        if not _REPO_RE.match(repo or ""):
            raise GitHubError(f"repository must be owner/name, got {repo!r}")
        self.repo = repo
        self.api_url = _check_api_url(api_url)
        self._http = http or retrying_session()
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "kiln-report",
        }

    def __repr__(self) -> str:  # never show the token, even in a debugger or traceback
        return f"GitHub(repo={self.repo!r}, api_url={self.api_url!r})"

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.api_url}{path}"
        try:
            resp = self._http.request(method, url, headers=self._headers, timeout=REQUEST_TIMEOUT_S,
                                      allow_redirects=False, **kwargs)
        except requests.RequestException as exc:
            raise GitHubError(f"GitHub API {method} {path}: {type(exc).__name__}") from None
        if resp.status_code >= 300:
            try:
                detail = str(resp.json().get("message", ""))[:200]
            except ValueError:
                detail = resp.text[:200]
            raise GitHubError(f"GitHub API {method} {path}: HTTP {resp.status_code} {detail}".rstrip())
        try:
            return resp.json() if resp.content else None
        except ValueError:
            raise GitHubError(f"GitHub API {method} {path}: answer is not JSON") from None

    def comments(self, pr: int) -> Iterator[dict]:
        """Every comment on pull request ``pr``, oldest first."""
        for page in range(1, MAX_PAGES + 1):
            batch = self._call("GET", f"/repos/{self.repo}/issues/{pr}/comments",
                               params={"per_page": PAGE_SIZE, "page": page})
            if not isinstance(batch, list):
                raise GitHubError(f"GitHub API comments of #{pr}: expected a list")
            yield from batch
            if len(batch) < PAGE_SIZE:
                return
        log.warning("stopped listing comments of #%d after %d pages", pr, MAX_PAGES)

    def find_comment(self, pr: int, session: str, author: str | None = BOT_LOGIN) -> dict | None:
        """This session's sticky comment on ``pr`` by ``author`` (None: any author)."""
        head = f"{MARKER}\n{session_marker(session)}\n"
        for comment in self.comments(pr):
            login = (comment.get("user") or {}).get("login")
            if str(comment.get("body", "")).startswith(head) and (author is None or login == author):
                return comment
        return None

    def upsert_comment(self, pr: int, report: str, session: str, *, author: str | None = BOT_LOGIN,
                       create: bool = True) -> tuple[str, int | None]:
        """Create or edit this session's sticky comment; (what happened, comment id).

        What happened is created, updated, unchanged, or skipped (``create`` False
        and no comment yet: a green run does not open a new comment).
        """
        body = comment_body(report, session)
        if len(body) > MAX_COMMENT_CHARS:
            raise GitHubError(f"comment is {len(body)} chars; GitHub allows {MAX_COMMENT_CHARS}")
        found = self.find_comment(pr, session, author)
        if found is not None:
            if found.get("body") == body:
                return "unchanged", found.get("id")
            self._call("PATCH", f"/repos/{self.repo}/issues/comments/{int(found['id'])}", json={"body": body})
            return "updated", found.get("id")
        if not create:
            return "skipped", None
        made = self._call("POST", f"/repos/{self.repo}/issues/{pr}/comments", json={"body": body})
        return "created", (made or {}).get("id")


def pr_from_event(env: Mapping[str, str]) -> int | None:
    """The pull request number of the Actions event in ``$GITHUB_EVENT_PATH``, if any."""
    path = env.get("GITHUB_EVENT_PATH")
    if not path:
        return None
    try:
        event = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise GitHubError(f"cannot read the event payload {path}: {exc}") from None
    number = (event.get("pull_request") or {}).get("number") if isinstance(event, dict) else None
    return number if isinstance(number, int) else None


def post_report(report: str, session: str, *, pr: int | None = None, repo: str | None = None,
                env: Mapping[str, str] | None = None, create: bool = True,
                author: str | None = BOT_LOGIN) -> tuple[str, int | None]:
    """Post ``report`` as ``session``'s sticky comment, with everything else from the environment.

    ``$GITHUB_TOKEN`` (required), ``$GITHUB_REPOSITORY`` and the PR of
    ``$GITHUB_EVENT_PATH`` unless given, ``$GITHUB_API_URL`` for the API.
    """
    env = os.environ if env is None else env
    pr = pr if pr is not None else pr_from_event(env)
    if pr is None:
        raise GitHubError("no pull request: pass --pr N, or run on a pull_request event")
    if pr < 1:
        raise GitHubError(f"pull request number must be positive, got {pr}")
    client = GitHub(env.get(TOKEN_ENV, ""), repo or env.get("GITHUB_REPOSITORY", ""),
                    env.get(API_URL_ENV) or DEFAULT_API_URL)
    outcome, comment_id = client.upsert_comment(pr, report, session, author=author, create=create)
    log.info("sticky comment for %s on %s#%d: %s", session, client.repo, pr, outcome)
    return outcome, comment_id
