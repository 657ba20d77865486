"""A tiny OpenAI-compatible HTTP client for the kits, built on requests.

Why not the ``openai`` package: the kits must see what the server actually sent
(raw status codes, malformed SSE lines, a missing ``[DONE]``), which a polished
client hides or retries away. Every request carries a timeout: a wedged engine
must fail one test, not eat the job's time budget.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

import requests

log = logging.getLogger(__name__)

# Connect timeout: the server is on 127.0.0.1 and already reported ready, so a
# connect that takes seconds means the listener is gone or wedged.
CONNECT_TIMEOUT_S = 5.0
# Read timeout for one non-streaming request: the longest kit request (a few
# hundred tokens on a 2-core CPU runner) finishes well inside this; a hung
# engine fails the test instead of the job.
REQUEST_TIMEOUT_S = 120.0
# Read timeout between two SSE chunks of a stream: the gap between tokens is
# milliseconds; a minute of silence means the stream is stuck.
STREAM_CHUNK_TIMEOUT_S = 60.0
# Scrapes and health probes are cheap; a slow one is itself a finding.
PROBE_TIMEOUT_S = 10.0
# How much of an unexpected response body goes into a failure message.
BODY_EXCERPT_CHARS = 300

SSE_DONE = "[DONE]"


class KitFailure(AssertionError):
    """A kit found the server misbehaving; the first line of the message is the cause."""


class EngineFault(KitFailure):
    """The server itself failed the request, whatever the kit was checking.

    ``kind`` is what it did: ``5xx`` (it answered a server error), ``hung``
    (no answer within the request timeout), ``connection`` (refused or dropped
    the connection) or ``protocol`` (a body or stream that is not the API's).
    The failure is then the engine's, not the assertion's: kiln types it so
    (ci/session/classify.py) and never retries it.
    """

    def __init__(self, kind: str, message: str, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status


class ServerLike(Protocol):
    """What a kit needs from a server: the pool's Server, or a test fake."""

    base_url: str
    served_model: str
    backend: Any


def excerpt(text: str, limit: int = BODY_EXCERPT_CHARS) -> str:
    """One line of at most ``limit`` characters, for failure messages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


@dataclass
class StreamResult:
    """Everything one SSE stream delivered, kept raw so a kit can judge it."""

    chunks: list[dict] = field(default_factory=list)
    done: bool = False
    # Payloads that were not JSON (and not [DONE]): a malformed stream.
    malformed: list[str] = field(default_factory=list)
    # Events that arrived after [DONE]: the terminator must be last.
    after_done: list[str] = field(default_factory=list)
    status: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0

    def text(self) -> str:
        """Concatenated completion text (``text`` or chat ``delta.content``) of choice 0."""
        parts = []
        for chunk in self.chunks:
            for choice in chunk.get("choices") or []:
                if choice.get("index", 0) == 0:
                    parts.append(_choice_text(choice))
        return "".join(parts)

    def usage(self) -> dict | None:
        """The last ``usage`` object the stream carried (with ``include_usage``)."""
        found = None
        for chunk in self.chunks:
            if chunk.get("usage"):
                found = chunk["usage"]
        return found

    def finish_reason(self) -> str | None:
        """The finish_reason of choice 0, if any chunk carried one."""
        reason = None
        for chunk in self.chunks:
            for choice in chunk.get("choices") or []:
                if choice.get("finish_reason"):
                    reason = choice["finish_reason"]
        return reason

    def content_chunks(self) -> int:
        """How many chunks carried non-empty text."""
        return sum(1 for c in self.chunks for ch in c.get("choices") or [] if _choice_text(ch))


def _choice_text(choice: dict) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


def parse_sse(lines: Iterable[str | bytes]) -> Iterator[str]:
    """Yield the data payload of each Server-Sent Event in ``lines``.

    Events are separated by blank lines; several ``data:`` lines in one event
    are joined with newlines (the SSE spec); ``:`` comment lines and other
    fields (``event:``, ``id:``) are ignored. A trailing event without its
    blank line is still yielded: a truncated stream is judged by the caller.
    """
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


class EngineClient:
    """OpenAI-compatible calls against one server, each with a timeout.

    One client per thread: ``requests.Session`` is not documented as
    thread-safe, so the concurrent kits build one client per worker.
    """

    def __init__(self, base_url: str, model: str, *, timeout_s: float = REQUEST_TIMEOUT_S):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self._session = requests.Session()

    def close(self) -> None:
        """Release pooled connections."""
        self._session.close()

    def __enter__(self) -> "EngineClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw HTTP -----------------------------------------------------------
    def get(self, path: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> requests.Response:
        """GET ``path``; connection errors become a KitFailure naming the URL."""
        return self._request("GET", path, timeout_s=timeout_s)

    def post(self, path: str, body: Any = None, *, raw: bytes | None = None,
             timeout_s: float | None = None) -> requests.Response:
        """POST JSON ``body`` (or ``raw`` bytes, for malformed-input tests) to ``path``."""
        return self._request("POST", path, body=body, raw=raw, timeout_s=timeout_s or self.timeout_s)

    def _request(self, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                 timeout_s: float, stream: bool = False) -> requests.Response:
        url = self.base_url + path
        kwargs: dict[str, Any] = {"timeout": (CONNECT_TIMEOUT_S, timeout_s), "stream": stream}
        if raw is not None:
            kwargs["data"] = raw
            kwargs["headers"] = {"Content-Type": "application/json"}
        elif body is not None:
            kwargs["json"] = body
        try:
            return self._session.request(method, url, **kwargs)
        except requests.Timeout:
            raise EngineFault("hung", f"{method} {path}: no answer within {timeout_s:.0f} s") from None
        except requests.ConnectionError as exc:
            raise EngineFault("connection", f"{method} {path}: connection failed: {excerpt(str(exc))}") from None

    # -- OpenAI endpoints ---------------------------------------------------
    def completion(self, prompt: str | list, **params: Any) -> dict:
        """POST /v1/completions; a non-2xx answer or a non-JSON body is a KitFailure."""
        body = {"model": self.model, "prompt": prompt, **params}
        return self._json_ok(self.post("/v1/completions", body), "/v1/completions")

    def chat(self, messages: list[dict], **params: Any) -> dict:
        """POST /v1/chat/completions; a non-2xx answer or a non-JSON body is a KitFailure."""
        body = {"model": self.model, "messages": messages, **params}
        return self._json_ok(self.post("/v1/chat/completions", body), "/v1/chat/completions")

    def stream_completion(self, prompt: str, **params: Any) -> StreamResult:
        """Stream /v1/completions and collect every event; see :class:`StreamResult`."""
        body = {"model": self.model, "prompt": prompt, "stream": True, **params}
        return self._stream("/v1/completions", body)

    def stream_chat(self, messages: list[dict], **params: Any) -> StreamResult:
        """Stream /v1/chat/completions and collect every event."""
        body = {"model": self.model, "messages": messages, "stream": True, **params}
        return self._stream("/v1/chat/completions", body)

    def open_stream(self, path: str, body: dict) -> requests.Response:
        """POST ``body`` and return the open streaming response, for a caller that reads
        part of it and then closes it (``with client.open_stream(...) as resp``)."""
        return self._request("POST", path, body=body, timeout_s=STREAM_CHUNK_TIMEOUT_S,
                             stream=True)

    def metrics_text(self, path: str = "/metrics") -> tuple[int, str]:
        """(status, body) of the metrics endpoint; the caller decides what a 404 means."""
        resp = self.get(path)
        return resp.status_code, resp.text

    def _json_ok(self, resp: requests.Response, path: str) -> dict:
        if not 200 <= resp.status_code < 300:
            raise status_failure(resp.status_code, f"POST {path} -> HTTP {resp.status_code}: {excerpt(resp.text)}")
        try:
            data = resp.json()
        except ValueError:
            raise EngineFault("protocol", f"POST {path} -> non-JSON body: {excerpt(resp.text)}") from None
        if not isinstance(data, dict):
            raise KitFailure(f"POST {path} -> JSON {type(data).__name__}, expected an object")
        return data

    def _stream(self, path: str, body: dict) -> StreamResult:
        result = StreamResult()
        start = time.monotonic()
        resp = self._request("POST", path, body=body, timeout_s=STREAM_CHUNK_TIMEOUT_S, stream=True)
        with resp:
            result.status = resp.status_code
            if not 200 <= resp.status_code < 300:
                raise status_failure(resp.status_code, f"POST {path} (stream) -> HTTP {resp.status_code}: "
                                                       f"{excerpt(resp.text)}")
            try:
                for payload in parse_sse(resp.iter_lines()):
                    self._take_event(result, payload, start)
            except requests.RequestException as exc:
                raise EngineFault("protocol", f"POST {path} (stream) broke after {len(result.chunks)} "
                                              f"chunks: {excerpt(str(exc))}") from None
        result.latency_s = time.monotonic() - start
        return result

    @staticmethod
    def _take_event(result: StreamResult, payload: str, start: float) -> None:
        if result.done:
            result.after_done.append(payload)
            return
        if payload.strip() == SSE_DONE:
            result.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            result.malformed.append(payload)
            return
        if not isinstance(chunk, dict):
            result.malformed.append(payload)
            return
        result.chunks.append(chunk)
        if result.ttft_s is None and any(_choice_text(c) for c in chunk.get("choices") or []):
            result.ttft_s = time.monotonic() - start


def status_failure(status: int, message: str) -> KitFailure:
    """The failure for a non-2xx answer: the engine's (EngineFault) for a 5xx, the kit's otherwise.

    A 4xx is the server judging the request, which is what a kit checks; a 5xx
    is the server failing it.
    """
    return EngineFault("5xx", message, status) if status >= 500 else KitFailure(message)


def client_for(server: ServerLike, *, timeout_s: float = REQUEST_TIMEOUT_S) -> EngineClient:
    """A client for ``server`` (anything with ``base_url`` and ``served_model``)."""
    return EngineClient(server.base_url, server.served_model, timeout_s=timeout_s)

