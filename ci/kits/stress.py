"""Scheduler-stress kit: many concurrent requests, plain and streaming, all succeed.

Asserts outcomes only (status, well-formed answers, exact token counts) --
never wall-clock speed, which belongs to the perf kit's per-profile budgets.
Each worker thread has its own client (requests.Session is not thread-safe).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ci.kits.api import check_health, check_usage
from ci.kits.client import EngineClient, KitFailure, ServerLike, client_for
from ci.kits.decode import exact_count_params, supports_ignore_eos

log = logging.getLogger(__name__)

# More requests than a CPU engine runs at once, so some queue (the waiting path).
REQUESTS = 16
CONCURRENCY = 8
MAX_TOKENS = 16


@dataclass(frozen=True)
class Outcome:
    """One request's result: an error string, or its token count."""

    index: int
    error: str | None
    completion_tokens: int = 0


def _prompt(i: int) -> str:
    # Distinct prompts so prefix caching cannot collapse the load into one request.
    return f"Request number {i}: write a sentence about the number {i * 7919 % 1000}"


def run_concurrent(server: ServerLike, worker, *, requests: int, concurrency: int) -> list[Outcome]:
    """Run ``worker(client, i) -> completion_tokens`` for i in range(requests) on
    ``concurrency`` threads, each thread with its own client; collect outcomes."""
    local = threading.local()
    clients: list[EngineClient] = []
    lock = threading.Lock()

    def call(i: int) -> Outcome:
        c = getattr(local, "client", None)
        if c is None:
            c = local.client = client_for(server)
            with lock:
                clients.append(c)
        try:
            return Outcome(i, None, worker(c, i))
        except KitFailure as exc:
            return Outcome(i, str(exc).splitlines()[0])

    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kiln-stress") as pool:
            return list(pool.map(call, range(requests)))
    finally:
        for c in clients:
            c.close()


def _report(title: str, outcomes: list[Outcome], expected_tokens: int | None) -> None:
    ok = [o for o in outcomes if o.error is None]
    print(f"{title}: {len(ok)}/{len(outcomes)} succeeded"
          + (f", {expected_tokens} tokens each expected" if expected_tokens else ""))
    for o in outcomes:
        if o.error is not None:
            print(f"  request {o.index}: {o.error}")


def _assert_all_ok(title: str, outcomes: list[Outcome], expected_tokens: int | None,
                   server: ServerLike) -> None:
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        raise KitFailure(f"{title}: {len(failed)}/{len(outcomes)} requests failed; first "
                         f"(request {failed[0].index}): {failed[0].error}")
    if expected_tokens is not None:
        short = [o for o in outcomes if o.completion_tokens != expected_tokens]
        if short:
            raise KitFailure(f"{title}: request {short[0].index} got {short[0].completion_tokens}"
                             f" tokens, expected {expected_tokens} (ignore_eos)")
    check_health(server)


def check_concurrent(server: ServerLike, *, requests: int = REQUESTS,
                     concurrency: int = CONCURRENCY, max_tokens: int = MAX_TOKENS) -> list[Outcome]:
    """``requests`` completions on ``concurrency`` threads all succeed with sane usage."""
    ignore_eos = supports_ignore_eos(server.backend)
    extra = exact_count_params(server.backend, ignore_eos)

    def one(c: EngineClient, i: int) -> int:
        resp = c.completion(_prompt(i), max_tokens=max_tokens, temperature=0, **extra)
        usage = check_usage(resp.get("usage"), where=f"request {i}", max_tokens=max_tokens)
        return usage["completion_tokens"]

    return _load_and_check(server, one, f"{requests} concurrent completions", requests, concurrency,
                           max_tokens if ignore_eos else None)


def _load_and_check(server: ServerLike, one, title: str, requests: int, concurrency: int,
                    expected: int | None) -> list[Outcome]:
    """Run ``one`` under load, print the outcome table, then assert every request succeeded."""
    outcomes = run_concurrent(server, one, requests=requests, concurrency=concurrency)
    _report(title, outcomes, expected)
    _assert_all_ok(title, outcomes, expected, server)
    return outcomes


def check_streaming_under_load(server: ServerLike, *, requests: int = REQUESTS,
                               concurrency: int = CONCURRENCY,
                               max_tokens: int = MAX_TOKENS) -> list[Outcome]:
    """``requests`` concurrent streams are each well-formed and end in [DONE]."""
    ignore_eos = supports_ignore_eos(server.backend)
    extra = exact_count_params(server.backend, ignore_eos)

    def one(c: EngineClient, i: int) -> int:
        res = c.stream_completion(_prompt(i), max_tokens=max_tokens, temperature=0,
                                  stream_options={"include_usage": True}, **extra)
        if res.malformed:
            raise KitFailure(f"stream {i}: {len(res.malformed)} non-JSON event(s)")
        if not res.done:
            raise KitFailure(f"stream {i}: ended after {len(res.chunks)} chunks without [DONE]")
        if res.after_done:
            raise KitFailure(f"stream {i}: events after [DONE]")
        usage = check_usage(res.usage(), where=f"stream {i}", max_tokens=max_tokens)
        return usage["completion_tokens"]

    return _load_and_check(server, one, f"{requests} concurrent streams", requests, concurrency,
                           max_tokens if ignore_eos else None)
