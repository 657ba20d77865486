"""The kits' HTTP client: SSE parsing and failure reporting."""
from __future__ import annotations

import socket

import pytest

from ci.kits.client import EngineClient, KitFailure, parse_sse
from tests.fakes.openai_engine import fake_engine


def test_parse_sse_splits_events_on_blank_lines():
    lines = [b"data: {\"a\": 1}", b"", b": keep-alive comment", b"", b"data: [DONE]", b""]
    assert list(parse_sse(lines)) == ['{"a": 1}', "[DONE]"]


def test_parse_sse_joins_multiline_data_and_ignores_other_fields():
    lines = ["event: message", "id: 7", "data: line one", "data:line two", "", ""]
    assert list(parse_sse(lines)) == ["line one\nline two"]


def test_parse_sse_yields_a_trailing_event_without_its_blank_line():
    # A truncated stream must reach the caller so it can be judged, not vanish.
    assert list(parse_sse(["data: {}", "data: x"])) == ["{}\nx"]


def test_stream_result_collects_text_usage_and_done():
    with fake_engine() as srv, EngineClient(srv.base_url, srv.served_model) as c:
        res = c.stream_completion("one two", max_tokens=3, stream_options={"include_usage": True})
    assert res.done and not res.malformed and not res.after_done
    assert res.content_chunks() == 3 and len(res.text().split()) == 3
    assert res.usage()["completion_tokens"] == 3
    assert res.finish_reason() == "length" and res.ttft_s is not None


def test_non_2xx_is_a_kit_failure_with_status_and_body():
    with fake_engine() as srv, EngineClient(srv.base_url, srv.served_model) as c:
        with pytest.raises(KitFailure, match=r"HTTP 400: .*max_tokens"):
            c.completion("x", max_tokens=-3)


def test_connection_refused_is_a_kit_failure_naming_the_path():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with EngineClient(f"http://127.0.0.1:{port}", "m") as c:
        with pytest.raises(KitFailure, match="GET /health: connection failed"):
            c.get("/health")
