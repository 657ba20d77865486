"""Kits for a topology: does traffic through a gateway reach every worker, answer as a worker
does, and survive a worker's death? Over HTTP only, like every kit.

A topology is a server-like ``gateway`` (base URL, served model, the
workers' backend) and ``workers`` (each server-like); a data-parallel group
without a gateway is checked with ``gateway=None``: the kit itself is then the
external load balancer, sending to each worker in turn. Each worker's own
request counter (``Gauges.requests``, read from its ``/metrics``) is the
witness: what the gateway reports about itself is not evidence that a worker
served anything.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ci.kits import metrics
from ci.kits.client import KitFailure, ServerLike, client_for, excerpt

log = logging.getLogger(__name__)

# Requests per worker through the gateway: with round robin each worker gets
# exactly this many; two make "every worker moved" and "evenly" both checkable.
REQUESTS_PER_WORKER = 2
# Short answers: the kit is about where requests go, not about decoding.
SPREAD_MAX_TOKENS = 8
# vLLM counts a request as finished as the response goes out; a scrape right
# after the last answer can miss the last increment. Polled, never slept on.
COUNTER_SETTLE_S = 10.0
COUNTER_POLL_S = 0.1
# Greedy answers compared through the gateway and straight from a worker.
COMPARE_MAX_TOKENS = 24
COMPARE_PROMPT = "Once upon a time, in a village by the sea, there lived"
COMPARE_CHAT = [{"role": "user", "content": "Tell me about the sea in one sentence."}]
# After a worker is killed: requests that must all succeed on the rest.
AFTER_KILL_REQUESTS = 6
# The gateway must take a dead worker out of its list within this long. kiln
# launches vllm-router with a 1 s health check and a threshold of 2 failures
# (ci/engine/gateway.py): ~2-3 s expected; the router's own health-check
# timeout (5 s) and a loaded runner make 20 s the bound.
TAKEN_OUT_DEADLINE_S = 20.0
TAKEN_OUT_POLL_S = 0.25


@dataclass(frozen=True)
class Spread:
    """How ``sent`` requests landed: each worker's counter delta, in worker order."""

    sent: int
    per_worker: tuple[int, ...]

    def line(self, workers: Sequence[ServerLike]) -> str:
        return ", ".join(f"worker {i} ({w.base_url}): {n}" for i, (w, n) in enumerate(zip(workers, self.per_worker)))


def request_count(worker: ServerLike) -> int:
    """The worker's own count of finished requests, from its ``/metrics``."""
    name = worker.backend.gauges.requests
    with client_for(worker) as c:
        samples = metrics.scrape(worker, c)
    metrics.require(worker, samples, [name], "finished-request counter")
    return int(metrics.counter_total(samples, name))


def _counts(workers: Sequence[ServerLike]) -> list[int]:
    return [request_count(w) for w in workers]


def _settled(workers: Sequence[ServerLike], before: list[int], sent: int) -> list[int]:
    """Counter deltas once they add up to ``sent`` or COUNTER_SETTLE_S passed (then as they are)."""
    deadline = time.monotonic() + COUNTER_SETTLE_S
    while True:
        deltas = [a - b for a, b in zip(_counts(workers), before)]
        if sum(deltas) >= sent or time.monotonic() >= deadline:
            return deltas
        time.sleep(COUNTER_POLL_S)  # bounded poll on the condition above


def check_spread(gateway: ServerLike | None, workers: Sequence[ServerLike], *,
                 per_worker: int = REQUESTS_PER_WORKER, even: bool = True) -> Spread:
    """Requests through ``gateway`` (or, with None, to each worker in turn) reach every worker.

    Fails naming each worker whose counter did not move, when the counters
    together moved by less than the requests answered (lost or uncounted),
    or, with ``even`` (round robin), when the split is uneven by more than one.
    """
    sent = per_worker * len(workers)
    before = _counts(workers)
    targets = [gateway] * sent if gateway is not None else [workers[i % len(workers)] for i in range(sent)]
    for i, target in enumerate(targets):
        with client_for(target) as c:
            body = c.completion(f"Request {i} of the spread check:", max_tokens=SPREAD_MAX_TOKENS,
                                temperature=0)
        if not (body.get("choices") or [{}])[0].get("text"):
            raise KitFailure(f"request {i} through {target.base_url} came back without text: "
                             f"{excerpt(str(body))}")
    spread = Spread(sent, tuple(_settled(workers, before, sent)))
    log.info("%d requests through %s: %s", sent, gateway.base_url if gateway else "the kit itself",
             spread.line(workers))
    idle = [f"worker {i} ({w.base_url})" for i, (w, n) in enumerate(zip(workers, spread.per_worker)) if n <= 0]
    if idle:
        raise KitFailure(f"{', '.join(idle)} served none of {sent} requests sent through "
                         f"{gateway.base_url if gateway else 'each worker in turn'} (counts: "
                         f"{spread.line(workers)})")
    if sum(spread.per_worker) < sent:
        raise KitFailure(f"the workers' counters moved by {sum(spread.per_worker)} for {sent} answered "
                         f"requests ({spread.line(workers)})")
    if even and max(spread.per_worker) - min(spread.per_worker) > 1:
        raise KitFailure(f"uneven split of {sent} requests: {spread.line(workers)}")
    return spread


# The label vLLM puts on each data-parallel rank's series (engine="0", "1", ...).
RANK_LABEL = "engine"


def rank_counts(server: ServerLike) -> dict[str, int]:
    """{rank: finished requests} from one server's ``/metrics``, by its series' rank label."""
    name = server.backend.gauges.requests
    with client_for(server) as c:
        samples = metrics.scrape(server, c)
    metrics.require(server, samples, [name], "finished-request counter")
    out: dict[str, int] = {}
    for labels, value in samples[name].items():
        rank = dict(labels).get(RANK_LABEL, "0")
        out[rank] = out.get(rank, 0) + int(value)
    return out


def check_rank_spread(server: ServerLike, ranks: int, *, per_rank: int = REQUESTS_PER_WORKER) -> dict[str, int]:
    """One server running the engine's own data parallelism (``--data-parallel-size ranks``):
    requests sent to it reach every rank, by each rank's request counter. Fails naming each
    rank that served none, or a server that shows fewer ranks than it was launched with."""
    sent = per_rank * ranks
    before = rank_counts(server)
    with client_for(server) as c:
        for i in range(sent):
            c.completion(f"Request {i} of the rank check:", max_tokens=SPREAD_MAX_TOKENS, temperature=0)
    deadline = time.monotonic() + COUNTER_SETTLE_S
    while True:
        after = rank_counts(server)
        deltas = {r: after[r] - before.get(r, 0) for r in sorted(after)}
        if sum(deltas.values()) >= sent or time.monotonic() >= deadline:
            break
        time.sleep(COUNTER_POLL_S)  # bounded poll on the condition above
    log.info("%d requests to %s: per rank %s", sent, server.base_url, deltas)
    if len(deltas) < ranks:
        raise KitFailure(f"{server.base_url} shows {len(deltas)} rank(s) ({RANK_LABEL} labels "
                         f"{sorted(deltas)}) in {server.backend.gauges.requests}; launched with {ranks}")
    idle = [r for r, n in deltas.items() if n <= 0]
    if idle:
        raise KitFailure(f"rank(s) {', '.join(idle)} of {server.base_url} served none of {sent} requests "
                         f"(per rank: {deltas})")
    return deltas


def _fetchers(server: ServerLike):
    """(name, fetch) for a greedy completion and chat, plain and streamed, against ``server``."""
    params: dict[str, Any] = {"max_tokens": COMPARE_MAX_TOKENS, "temperature": 0}

    def completion(c):
        return (c.completion(COMPARE_PROMPT, **params)["choices"] or [{}])[0].get("text") or ""

    def chat(c):
        return ((c.chat(COMPARE_CHAT, **params)["choices"] or [{}])[0].get("message") or {}).get("content") or ""

    return (("completion", completion),
            ("completion (stream)", lambda c: c.stream_completion(COMPARE_PROMPT, **params).text()),
            ("chat", chat),
            ("chat (stream)", lambda c: c.stream_chat(COMPARE_CHAT, **params).text()))


def check_same_answers(front: ServerLike, reference: ServerLike, *, repeat: int = 1) -> dict[str, str]:
    """Greedy answers from ``front`` (a gateway, or another replica) equal ``reference``'s:
    completion and chat, plain and streamed. Each is asked of ``front`` ``repeat`` times in a
    row, so a round-robin gateway answers it from each of its workers. Fails naming the
    request and the first character that differs."""
    want: dict[str, str] = {}
    with client_for(reference) as ref, client_for(front) as c:
        for what, fetch in _fetchers(reference):
            want[what] = text = fetch(ref)
            if not text:
                raise KitFailure(f"{what}: {reference.base_url} answered a greedy request with empty text")
            for r in range(repeat):
                got = fetch(c)
                if got != text:
                    at = next((i for i, (a, b) in enumerate(zip(text, got)) if a != b), min(len(text), len(got)))
                    raise KitFailure(f"{what} through {front.base_url} (ask {r + 1} of {repeat}) differs from "
                                     f"{reference.base_url} at character {at}: {got[at:at + 24]!r} vs "
                                     f"{text[at:at + 24]!r}")
    return want


def gateway_health(gateway: ServerLike) -> dict[str, bool]:
    """{worker URL: healthy} as the gateway's own worker list says now."""
    spec = gateway.spec
    with client_for(gateway) as c:
        resp = c.get(spec.workers_path)
    if resp.status_code != 200:
        raise KitFailure(f"GET {spec.workers_path} on {gateway.base_url} -> HTTP {resp.status_code}: "
                         f"{excerpt(resp.text)}")
    try:
        return spec.read_health(resp.json())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KitFailure(f"GET {spec.workers_path} on {gateway.base_url}: unreadable worker list "
                         f"{excerpt(resp.text)}") from None


@dataclass(frozen=True)
class Failover:
    """What happened after a worker was killed."""

    victim: str
    succeeded: int
    taken_out_s: float


def check_killed_worker_taken_out(gateway: ServerLike, workers: Sequence[ServerLike], victim: int,
                                  kill: Callable[[], None], *, requests: int = AFTER_KILL_REQUESTS,
                                  deadline_s: float = TAKEN_OUT_DEADLINE_S) -> Failover:
    """Kill worker ``victim`` (``kill()``); every later request through the gateway must still
    succeed, and the gateway's own worker list must call the victim unhealthy within
    ``deadline_s``. Fails naming the worker either way."""
    url = workers[victim].base_url
    name = f"worker {victim} ({url})"
    health = gateway_health(gateway)
    sick = [u for u in (w.base_url for w in workers) if not health.get(u)]
    if sick:
        raise KitFailure(f"before the kill the gateway already called {', '.join(sick)} unhealthy")
    kill()
    killed_at = time.monotonic()
    failures = []
    with client_for(gateway) as c:
        for i in range(requests):
            try:
                c.completion(f"After the kill, request {i}:", max_tokens=SPREAD_MAX_TOKENS, temperature=0)
            except KitFailure as exc:
                failures.append(f"request {i}: {str(exc).splitlines()[0]}")
    if failures:
        raise KitFailure(f"the gateway kept routing to the killed {name}: {len(failures)} of {requests} "
                         f"requests failed ({failures[0]})")
    while True:
        health = gateway_health(gateway)
        if health.get(url) is False:
            taken_out = time.monotonic() - killed_at
            break
        if url not in health:  # dropped from the list altogether: also taken out
            taken_out = time.monotonic() - killed_at
            break
        if time.monotonic() - killed_at >= deadline_s:
            raise KitFailure(f"the gateway still calls the killed {name} healthy {deadline_s:.0f} s after "
                             f"the kill ({requests} requests succeeded on the rest meanwhile)")
        time.sleep(TAKEN_OUT_POLL_S)  # bounded poll on the condition above
    log.info("killed %s: %d/%d requests through the gateway succeeded; taken out after %.1f s",
             name, requests, requests, taken_out)
    return Failover(name, requests, taken_out)
