"""API-semantics kit: request parameters do what they promise.

ci/kits/api.py checks the *shape* of answers; this kit checks their *meaning*:

- a streamed greedy answer is the same text as the non-streamed one;
- a stream the client drops mid-way frees the engine (running gauge back to 0,
  health 200) -- a leaked request slot shrinks capacity silently, run by run;
- a prompt longer than the context gets a 400 whose message names the limit;
- ``n`` gives n choices, ``stop`` ends the text before the stop string,
  ``seed`` makes sampling repeatable, ``logprobs`` are consistent with the
  greedy choice;
- a JSON-schema ``response_format`` yields JSON that validates (with the
  ``jsonschema`` library: every keyword, ``maxLength`` included), where the
  engine supports structured output (the test skips with the probe's reason
  where it does not).
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Iterable, Mapping

import jsonschema

from ci.kits.api import check_health, check_models, check_usage
from ci.kits.client import KitFailure, ServerLike, client_for, excerpt, status_failure
from ci.kits.decode import exact_count_params, logprob_lists
from ci.kits.metrics import SETTLE_DEADLINE_S, wait_idle

log = logging.getLogger(__name__)

PROMPT = "Here is a short list of fruits and their colors: apple is red, banana is"
CHAT = [{"role": "user", "content": "Name three colors of the rainbow."}]
# Enough tokens that streaming and batching paths diverge if they are going to.
STREAM_TOKENS = 32
# The aborted stream asks for many tokens and reads only a few: the engine is
# still decoding when the client goes away.
ABORT_MAX_TOKENS = 512
ABORT_AFTER_CHUNKS = 3
N_CHOICES = 3
SAMPLE_TOKENS = 16
SEED = 1234
TOP_LOGPROBS = 3
# Logprobs are rounded/serialised by engines; the greedy token's logprob and
# the top list's best value agree to far better than this when correct.
LOGPROB_EPS = 1e-3
# How far past the context limit the over-long prompt goes: clearly over, so
# no engine can fit it by counting a special token differently.
OVERFLOW_FACTOR = 1.5
SCHEMA_TOKENS = 48
# A name within maxLength still fits SCHEMA_TOKENS with the rest of the object.
SCHEMA_NAME_MAX = 12


def default_schema() -> dict[str, Any]:
    """The schema ``check_structured_output`` asks for: an object of a fixed shape, which any
    schema-guided decoder can force even from a model that writes gibberish.

    A new dict each call: a module-level one, shared as a default, would carry
    any caller's change to it into every later check.
    """
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": SCHEMA_NAME_MAX},
                       "count": {"type": "integer"}},
        "required": ["name", "count"],
        "additionalProperties": False,
    }


def _extra(server: ServerLike) -> dict:
    return exact_count_params(server.backend)


def _text(choice: dict) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("message") or {}).get("content") or ""


def check_stream_matches_plain(server: ServerLike, *, chat: bool = False,
                               max_tokens: int = STREAM_TOKENS) -> str:
    """Greedy streamed text == greedy non-streamed text for the same request."""
    params = {"max_tokens": max_tokens, "temperature": 0, **_extra(server)}
    with client_for(server) as c:
        if chat:
            plain = c.chat(CHAT, **params)
            streamed = c.stream_chat(CHAT, **params)
        else:
            plain = c.completion(PROMPT, **params)
            streamed = c.stream_completion(PROMPT, **params)
    choices = plain.get("choices") or [{}]
    want, got = _text(choices[0]), streamed.text()
    print(f"plain:    {want[:80]!r}\nstreamed: {got[:80]!r}")
    if want != got:
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise KitFailure(f"{'chat' if chat else 'completion'}: streamed text differs from the "
                         f"non-streamed text at character {at}: {got[at:at + 20]!r} vs "
                         f"{want[at:at + 20]!r}")
    return got


def check_stream_abort_recovers(server: ServerLike, *, read_chunks: int = ABORT_AFTER_CHUNKS,
                                max_tokens: int = ABORT_MAX_TOKENS,
                                deadline_s: float = SETTLE_DEADLINE_S) -> None:
    """A stream closed by the client after a few chunks frees the engine and leaves it healthy."""
    body = {"model": server.served_model, "prompt": PROMPT, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **_extra(server)}
    with client_for(server) as c:
        with c.open_stream("/v1/completions", body) as resp:
            if resp.status_code != 200:
                raise status_failure(resp.status_code,
                                     f"stream to abort -> HTTP {resp.status_code}: {excerpt(resp.text)}")
            seen = 0
            for line in resp.iter_lines():
                if line.startswith(b"data:"):
                    seen += 1
                    if seen >= read_chunks:
                        break
        # Leaving the block closed the socket mid-stream.
        if seen < read_chunks:
            raise KitFailure(f"stream ended after {seen} chunks, before the client could abort it")
        settled_s, polls = wait_idle(server, c, deadline_s=deadline_s, after="an aborted stream")
    check_health(server)
    with client_for(server) as c:  # and it still serves
        check_usage(c.completion(PROMPT, max_tokens=4, temperature=0).get("usage"),
                    where="completion after an aborted stream", max_tokens=4)
    print(f"aborted after {seen} of {max_tokens} tokens: engine idle again after "
          f"{settled_s:.2f} s ({polls} scrapes), healthy, serving")


def check_context_limit(server: ServerLike, *, max_model_len: int | None = None) -> None:
    """A prompt longer than the context gets a 400 whose message names the limit."""
    limit = max_model_len or check_models(server).get("max_model_len")
    if not isinstance(limit, int) or limit <= 0:
        raise KitFailure(f"/v1/models gives no max_model_len ({limit!r}); pass max_model_len")
    # " word" is one token in any BPE vocabulary worth the name; 1.5x the limit
    # is over whatever the tokenizer makes of it.
    prompt = "word " * int(limit * OVERFLOW_FACTOR)
    with client_for(server) as c:
        resp = c.post("/v1/completions", {"model": server.served_model, "prompt": prompt,
                                          "max_tokens": 4})
    print(f"prompt of ~{int(limit * OVERFLOW_FACTOR)} tokens, limit {limit}: HTTP "
          f"{resp.status_code} {excerpt(resp.text, 200)}")
    if resp.status_code != 400:
        raise status_failure(resp.status_code, f"over-long prompt -> HTTP {resp.status_code}, expected 400: "
                                               f"{excerpt(resp.text)}")
    if str(limit) not in resp.text:
        raise KitFailure(f"over-long prompt: the 400 does not name the limit {limit}: "
                         f"{excerpt(resp.text)}")
    check_health(server)


def check_n_choices(server: ServerLike, *, n: int = N_CHOICES) -> None:
    """``n`` > 1 returns n choices, indexed 0..n-1, and usage counts all of them."""
    with client_for(server) as c:
        resp = c.completion(PROMPT, n=n, max_tokens=SAMPLE_TOKENS, temperature=1.0, seed=SEED,
                            **_extra(server))
    choices = resp.get("choices") or []
    indices = sorted(ch.get("index") for ch in choices)
    if indices != list(range(n)):
        raise KitFailure(f"n={n}: choice indices {indices}, expected {list(range(n))}")
    usage = check_usage(resp.get("usage"), where=f"n={n}")
    if _extra(server) and usage["completion_tokens"] != n * SAMPLE_TOKENS:
        raise KitFailure(f"n={n}: usage.completion_tokens {usage['completion_tokens']} != "
                         f"{n} x {SAMPLE_TOKENS} (ignore_eos)")
    print(f"n={n}: {len(choices)} choices, {usage['completion_tokens']} completion tokens")


def check_stop_string(server: ServerLike) -> None:
    """A ``stop`` string taken from the greedy text ends the text just before it."""
    with client_for(server) as c:
        full = _text((c.completion(PROMPT, max_tokens=STREAM_TOKENS, temperature=0,
                                   **_extra(server)).get("choices") or [{}])[0])
        words = full.split()
        # A word from the middle, so the expected prefix is not empty.
        stop = next((w for w in words[len(words) // 2:] if full.find(w) > 0), None)
        if stop is None:
            raise KitFailure(f"stop: greedy text too short to pick a stop string from: {full!r}")
        resp = c.completion(PROMPT, max_tokens=STREAM_TOKENS, temperature=0, stop=[stop],
                            **_extra(server))
    choice = (resp.get("choices") or [{}])[0]
    want = full[:full.find(stop)]
    print(f"stop={stop!r}: {choice.get('text')!r} (finish_reason {choice.get('finish_reason')!r})")
    if choice.get("text") != want or choice.get("finish_reason") != "stop":
        raise KitFailure(f"stop={stop!r}: text {excerpt(repr(choice.get('text')), 80)}, "
                         f"finish_reason {choice.get('finish_reason')!r}; expected "
                         f"{excerpt(repr(want), 80)} and 'stop'")


def check_seed_reproducible(server: ServerLike) -> None:
    """Temperature-1 sampling with the same ``seed`` gives the same text twice."""
    params = {"max_tokens": SAMPLE_TOKENS, "temperature": 1.0, "seed": SEED, **_extra(server)}
    with client_for(server) as c:
        runs = [_text((c.completion(PROMPT, **params).get("choices") or [{}])[0])
                for _ in range(2)]
    print(f"seed={SEED} x2: {runs[0][:60]!r}")
    if runs[0] != runs[1]:
        raise KitFailure(f"seed={SEED} sampled different texts: {runs[0][:40]!r} vs "
                         f"{runs[1][:40]!r}")


def check_logprobs(server: ServerLike, *, top: int = TOP_LOGPROBS) -> None:
    """Greedy ``logprobs``: one entry per token, <= 0, at most ``top`` alternatives, and the
    chosen token's logprob is the best of its list."""
    with client_for(server) as c:
        resp = c.completion(PROMPT, max_tokens=SAMPLE_TOKENS, temperature=0, logprobs=top,
                            **_extra(server))
    choice = (resp.get("choices") or [{}])[0]
    tokens, values, tops = logprob_lists(choice.get("logprobs"), f"logprobs={top}")
    if not tokens:
        raise KitFailure(f"logprobs={top}: no tokens in the answer's logprobs")
    usage = check_usage(resp.get("usage"), where=f"logprobs={top}")
    if len(tokens) != usage["completion_tokens"]:
        raise KitFailure(f"logprobs={top}: {len(tokens)} entries for "
                         f"{usage['completion_tokens']} completion tokens")
    for i, (tok, value, alts) in enumerate(zip(tokens, values, tops)):
        if not isinstance(value, (int, float)) or math.isnan(value) or value > 0:
            raise KitFailure(f"logprobs: token {i} {tok!r} has logprob {value!r}")
        if not isinstance(alts, dict) or not 1 <= len(alts) <= top + 1:
            raise KitFailure(f"logprobs: token {i} has {alts!r} as its top list (asked {top})")
        if max(alts.values()) > value + LOGPROB_EPS:
            raise KitFailure(f"logprobs: greedy token {i} {tok!r} ({value:.4f}) is not the best "
                             f"of its top list {alts}")
    print(f"logprobs={top}: {len(tokens)} tokens, each the best of its top list")


def check_structured_output(server: ServerLike, *, schema: Mapping[str, Any] | None = None) -> dict:
    """A ``json_schema`` response_format yields JSON that validates against the schema
    (``default_schema()`` unless given), every keyword included."""
    schema = default_schema() if schema is None else schema
    fmt = {"type": "json_schema", "json_schema": {"name": "kiln_check", "schema": schema}}
    with client_for(server) as c:
        resp = c.chat(CHAT, max_tokens=SCHEMA_TOKENS, temperature=0, response_format=fmt)
    text = _text((resp.get("choices") or [{}])[0])
    print(f"structured output: {text!r}")
    try:
        obj = json.loads(text)
    except ValueError:
        raise KitFailure(f"response_format json_schema gave text that is not JSON: "
                         f"{excerpt(text, 120)!r}") from None
    problems = schema_problems(obj, schema)
    if problems:
        raise KitFailure(f"response_format json_schema: the JSON does not match: {problems[0]}"
                         + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    return obj


def _where(path: Iterable[Any]) -> str:
    """A JSONPath-like location: ``$``, ``$.name``, ``$.items[2]``."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def schema_problems(obj: Any, schema: Mapping[str, Any]) -> list[str]:
    """Every way ``obj`` breaks ``schema`` (jsonschema, the schema's own draft or 2020-12), by location.

    A schema that is itself invalid raises ValueError in one line: that is the
    caller's mistake, not the engine's.
    """
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON schema: {exc.message}") from None
    errors = sorted(cls(schema).iter_errors(obj), key=lambda e: (_where(e.absolute_path), e.message))
    return [f"{_where(e.absolute_path)}: {e.message}" for e in errors]


# Flags by which an engine's --help says it does schema-guided decoding.
STRUCTURED_OUTPUT_FLAGS = ("--structured-outputs-config", "--guided-decoding-backend",
                           "--grammar-backend")


def structured_output_unsupported(probe: Any) -> str | None:
    """Why the engine cannot do structured output (a compat.FlagProbe's view), or None."""
    if any(probe.has(f) for f in STRUCTURED_OUTPUT_FLAGS):
        return None
    return (f"{probe.engine} {probe.version}: --help has none of "
            f"{', '.join(STRUCTURED_OUTPUT_FLAGS)} (no schema-guided decoding)")

