"""API-contract kit: the OpenAI-compatible surface a client relies on.

Checks health, /v1/models, completions, chat, SSE streaming (well-formed JSON
events ending in ``[DONE]``, nothing after it), ``usage`` arithmetic, and that
malformed requests get a 4xx -- a 5xx means the engine blamed itself for the
client's mistake, and often that a worker died -- after which the server must
still answer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from ci.kits.client import KitFailure, ServerLike, client_for, excerpt, status_failure

log = logging.getLogger(__name__)

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
CHAT = [{"role": "user", "content": "Say hello in five words."}]
# Short outputs keep the contract checks to a second or two even on CPU.
MAX_TOKENS = 8


@dataclass(frozen=True)
class BadRequest:
    """One malformed request and why a client could send it."""

    name: str
    path: str
    body: Any = None
    raw: bytes | None = None


def bad_requests(model: str, *, rejects_unknown_model: bool = True) -> list[BadRequest]:
    """The malformed requests every engine must answer with a 4xx (an unknown model
    only where the engine checks the field: BackendSpec.rejects_unknown_model)."""
    ok = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    cases = [
        BadRequest("body is not JSON", "/v1/completions", raw=b"{not json"),
        BadRequest("negative max_tokens", "/v1/completions", {**ok, "max_tokens": -1}),
        BadRequest("negative temperature", "/v1/completions", {**ok, "temperature": -1.0}),
        BadRequest("prompt of the wrong type", "/v1/completions", {**ok, "prompt": {"a": 1}}),
        BadRequest("unknown model", "/v1/completions", {**ok, "model": model + "-does-not-exist"}),
        BadRequest("chat without messages", "/v1/chat/completions",
                   {"model": model, "max_tokens": MAX_TOKENS}),
        BadRequest("chat messages of the wrong type", "/v1/chat/completions",
                   {"model": model, "messages": "hello", "max_tokens": MAX_TOKENS}),
    ]
    return [c for c in cases if rejects_unknown_model or c.name != "unknown model"]


def check_health(server: ServerLike) -> None:
    """The backend's health endpoint answers 200."""
    with client_for(server) as c:
        resp = c.get(server.backend.health_path)
        if resp.status_code != 200:
            raise status_failure(resp.status_code, f"health {server.backend.health_path} -> HTTP "
                                                   f"{resp.status_code}: {excerpt(resp.text)}")


def check_models(server: ServerLike) -> dict:
    """/v1/models lists the served model; returns its entry."""
    with client_for(server) as c:
        path = server.backend.models_path
        resp = c.get(path)
        if resp.status_code != 200:
            raise status_failure(resp.status_code, f"{path} -> HTTP {resp.status_code}: {excerpt(resp.text)}")
        try:
            data = resp.json().get("data")
        except (ValueError, AttributeError):
            raise KitFailure(f"{path} -> not an object with 'data': {excerpt(resp.text)}") from None
        ids = [m.get("id") for m in data or [] if isinstance(m, dict)]
        if server.served_model not in ids:
            raise KitFailure(f"{path} does not list {server.served_model!r}; it lists {ids}")
        return next(m for m in data if m.get("id") == server.served_model)


def check_usage(usage: Any, *, where: str, max_tokens: int | None = None) -> dict:
    """``usage`` has non-negative integer counts, total = prompt + completion, within max_tokens."""
    if not isinstance(usage, dict):
        raise KitFailure(f"{where}: no usage object (got {usage!r})")
    counts = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise KitFailure(f"{where}: usage.{key} is {value!r}, expected a non-negative integer")
        counts[key] = value
    if counts["total_tokens"] != counts["prompt_tokens"] + counts["completion_tokens"]:
        raise KitFailure(f"{where}: usage total_tokens {counts['total_tokens']} != prompt "
                         f"{counts['prompt_tokens']} + completion {counts['completion_tokens']}")
    if counts["prompt_tokens"] == 0:
        raise KitFailure(f"{where}: usage.prompt_tokens is 0 for a non-empty prompt")
    if max_tokens is not None and counts["completion_tokens"] > max_tokens:
        raise KitFailure(f"{where}: usage.completion_tokens {counts['completion_tokens']} > "
                         f"max_tokens {max_tokens}")
    return counts


def _one_choice(resp: dict, where: str) -> dict:
    choices = resp.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise KitFailure(f"{where}: expected exactly one choice, got {excerpt(repr(choices))}")
    return choices[0]


def check_completion(server: ServerLike) -> dict:
    """A plain completion returns text, a finish_reason and consistent usage."""
    with client_for(server) as c:
        resp = c.completion(PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    choice = _one_choice(resp, "completion")
    if not isinstance(choice.get("text"), str):
        raise KitFailure(f"completion: choice.text is {choice.get('text')!r}, expected a string")
    if choice.get("finish_reason") not in ("length", "stop"):
        raise KitFailure(f"completion: finish_reason {choice.get('finish_reason')!r}")
    check_usage(resp.get("usage"), where="completion", max_tokens=MAX_TOKENS)
    return resp


def check_chat(server: ServerLike) -> dict:
    """A chat completion returns an assistant message and consistent usage."""
    with client_for(server) as c:
        resp = c.chat(CHAT, max_tokens=MAX_TOKENS, temperature=0)
    choice = _one_choice(resp, "chat")
    message = choice.get("message") or {}
    if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
        raise KitFailure(f"chat: message is {excerpt(repr(message))}, expected an assistant "
                         f"message with string content")
    check_usage(resp.get("usage"), where="chat", max_tokens=MAX_TOKENS)
    return resp


def check_streaming(server: ServerLike, *, chat: bool = False) -> None:
    """A stream is JSON events only, ends in [DONE] with nothing after, and its usage adds up.

    Its prompt token count must equal the non-streaming answer's: the same
    prompt tokenizes the same way whichever path serves it.
    """
    where = "chat stream" if chat else "completion stream"
    params = {"max_tokens": MAX_TOKENS, "temperature": 0,
              "stream_options": {"include_usage": True}}
    with client_for(server) as c:
        result = c.stream_chat(CHAT, **params) if chat else c.stream_completion(PROMPT, **params)
        plain = (c.chat(CHAT, max_tokens=MAX_TOKENS, temperature=0) if chat
                 else c.completion(PROMPT, max_tokens=MAX_TOKENS, temperature=0))
    if result.malformed:
        raise KitFailure(f"{where}: {len(result.malformed)} event(s) are not JSON, first: "
                         f"{excerpt(result.malformed[0], 120)!r}")
    if not result.done:
        raise KitFailure(f"{where}: ended after {len(result.chunks)} chunks without data: [DONE]")
    if result.after_done:
        raise KitFailure(f"{where}: {len(result.after_done)} event(s) after [DONE]")
    if not result.chunks:
        raise KitFailure(f"{where}: no chunks before [DONE]")
    if result.finish_reason() not in ("length", "stop"):
        raise KitFailure(f"{where}: finish_reason {result.finish_reason()!r}")
    usage = check_usage(result.usage(), where=where, max_tokens=MAX_TOKENS)
    plain_usage = check_usage(plain.get("usage"), where=where.replace("stream", "(plain)"))
    if usage["prompt_tokens"] != plain_usage["prompt_tokens"]:
        raise KitFailure(f"{where}: usage.prompt_tokens {usage['prompt_tokens']} != "
                         f"{plain_usage['prompt_tokens']} for the same prompt without streaming")
    if result.content_chunks() > usage["completion_tokens"]:
        raise KitFailure(f"{where}: {result.content_chunks()} text chunks but usage says "
                         f"{usage['completion_tokens']} completion tokens")


def check_bad_requests(server: ServerLike, cases: list[BadRequest] | None = None) -> None:
    """Every malformed request gets a 4xx, and the server is healthy afterwards."""
    if cases is None:
        checks_model = getattr(server.backend, "rejects_unknown_model", True)
        cases = bad_requests(server.served_model, rejects_unknown_model=checks_model)
        if not checks_model:
            print(f"{server.backend.name} serves any model name (BackendSpec.rejects_unknown_model): "
                  f"'unknown model' is not asked")
    rows, wrong = [], []
    with client_for(server) as c:
        for case in cases:
            resp = c.post(case.path, case.body, raw=case.raw)
            rows.append((case.name, resp.status_code))
            if not 400 <= resp.status_code < 500:
                wrong.append(f"{case.name} -> HTTP {resp.status_code} ({excerpt(resp.text, 120)})")
    print(f"{'bad request':<34} status")
    for name, status in rows:
        print(f"{name:<34} {status}")
    if wrong:
        raise KitFailure(f"{len(wrong)} malformed request(s) did not get a 4xx: {wrong[0]}"
                         + "".join(f"\n  {w}" for w in wrong[1:]))
    # A 4xx that took the engine down with it is still a failure.
    check_health(server)


ALL_CHECKS: tuple[Callable[[ServerLike], Any], ...] = (
    check_health, check_models, check_completion, check_chat, check_streaming,
    check_bad_requests,
)


def check_api_contract(server: ServerLike) -> None:
    """Run every API-contract check above; the first failure is raised."""
    for check in ALL_CHECKS:
        log.info("api contract: %s", check.__name__)
        check(server)
    check_streaming(server, chat=True)


__all__ = ["BadRequest", "bad_requests", "check_api_contract", "check_bad_requests",
           "check_chat", "check_completion", "check_health", "check_models",
           "check_streaming", "check_usage"]
