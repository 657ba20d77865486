"""Decode-correctness kit: greedy determinism, exact max_tokens, batch == singles.

These are about counts and determinism, not content: the CPU profile serves a
random-weight model whose text is gibberish, yet greedy decoding of gibberish
must still repeat token for token, stop at exactly ``max_tokens`` when EOS is
ignored, and not change because other prompts shared the batch.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Sequence

from ci.kits.api import check_usage
from ci.kits.client import EngineClient, KitFailure, ServerLike, client_for, excerpt

log = logging.getLogger(__name__)

# Engines that accept ``ignore_eos`` in the request body (an extension to the
# OpenAI schema). Without it a model may legitimately stop early, and
# "max_tokens honoured exactly" can only be checked as "at most".

PROMPT = "In a quiet village by the sea, the old lighthouse keeper"
PROMPTS = (
    "The recipe for bread begins with",
    "Rain fell on the city all night, and",
    "A list of prime numbers: 2, 3, 5,",
    "Dear team, the meeting has been moved to",
)
# Long enough that an early divergence is not luck, short enough for CPU.
DETERMINISM_TOKENS = 32
BATCH_TOKENS = 16
# 1 (the edge case), a small odd number, and one crossing typical block sizes (16/32).
MAX_TOKENS_CASES = (1, 7, 33)


@dataclass(frozen=True)
class Decoded:
    """One choice's generated tokens (as the engine's logprobs name them) and text."""

    tokens: tuple[str, ...]
    text: str
    finish_reason: str | None
    completion_tokens: int


def supports_ignore_eos(backend: object) -> bool:
    """Whether ``backend`` (a BackendSpec) accepts ``ignore_eos`` in the request body."""
    return bool(getattr(backend, "accepts_ignore_eos", False))


def exact_count_params(backend: object, ignore_eos: bool | None = None) -> dict:
    """Request fields that make the engine decode exactly ``max_tokens`` (EOS ignored):
    ``{"ignore_eos": True}`` where the engine takes it, else nothing. ``ignore_eos``
    forces the choice (None: the backend's spec decides). The one place the field is spelled."""
    use = supports_ignore_eos(backend) if ignore_eos is None else ignore_eos
    return {"ignore_eos": True} if use else {}


def logprob_lists(logprobs: object, where: str, *, with_top: bool = True) -> tuple[list, list, list]:
    """(tokens, token_logprobs, top_logprobs) of an OpenAI completions ``logprobs`` object,
    checked to be lists of one length; KitFailure naming ``where`` otherwise. Without
    ``with_top`` the top lists are not required (returned empty). The one place the
    shape of an answer's logprobs is checked (api, reference and accuracy kits)."""
    lp = logprobs if isinstance(logprobs, dict) else {}
    tokens, values = lp.get("tokens"), lp.get("token_logprobs")
    tops = lp.get("top_logprobs") if with_top else []
    lists = [tokens, values] + ([tops] if with_top else [])
    if not all(isinstance(x, list) for x in lists) or len({len(x) for x in lists}) != 1:
        names = "tokens/token_logprobs" + ("/top_logprobs" if with_top else "")
        raise KitFailure(f"{where}: logprobs {names} missing or of different lengths: "
                         f"{excerpt(json.dumps(lp), 200)}")
    return tokens, values, tops


def _extra(server: ServerLike, ignore_eos: bool | None) -> dict:
    return exact_count_params(server.backend, ignore_eos)


def _decoded(choice: dict, where: str, completion_tokens: int = -1) -> Decoded:
    logprobs = choice.get("logprobs") or {}
    tokens = logprobs.get("tokens")
    if not isinstance(tokens, list):
        raise KitFailure(f"{where}: no logprobs.tokens in the answer (asked for logprobs=1)")
    return Decoded(tuple(tokens), choice.get("text") or "", choice.get("finish_reason"),
                   completion_tokens)


def greedy(client: EngineClient, prompt: str | list[str], max_tokens: int,
           extra: dict) -> list[Decoded]:
    """Temperature-0 completion(s) of ``prompt`` with token-level logprobs, in prompt order."""
    resp = client.completion(prompt, max_tokens=max_tokens, temperature=0, logprobs=1, **extra)
    choices = sorted(resp.get("choices") or [], key=lambda ch: ch.get("index", 0))
    n = len(prompt) if isinstance(prompt, list) else 1
    if len(choices) != n:
        raise KitFailure(f"asked for {n} completion(s), got {len(choices)} choices")
    usage = check_usage(resp.get("usage"), where="greedy completion")
    per_choice = usage["completion_tokens"] if n == 1 else -1
    return [_decoded(ch, "greedy completion", per_choice) for ch in choices]


def first_divergence(a: Sequence[str], b: Sequence[str]) -> int | None:
    """Index of the first differing token (or the shorter length); None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _diff_message(what: str, a: Decoded, b: Decoded) -> str:
    i = first_divergence(a.tokens, b.tokens)
    if i is None:
        return f"{what}: same tokens but different text: {a.text!r} vs {b.text!r}"
    return (f"{what}: tokens diverge at position {i} of {len(a.tokens)}/{len(b.tokens)}: "
            f"{a.tokens[i:i + 3]!r} vs {b.tokens[i:i + 3]!r}")


def check_greedy_deterministic(server: ServerLike, *, prompt: str = PROMPT,
                               max_tokens: int = DETERMINISM_TOKENS, repeats: int = 2,
                               ignore_eos: bool | None = None) -> list[Decoded]:
    """Temperature 0 ``repeats`` times gives identical tokens and text."""
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 to compare anything, got {repeats}")
    extra = _extra(server, ignore_eos)
    with client_for(server) as c:
        runs = [greedy(c, prompt, max_tokens, extra)[0] for _ in range(repeats)]
    print(f"greedy x{repeats}: {len(runs[0].tokens)} tokens, first run {runs[0].text[:60]!r}")
    for n, run in enumerate(runs[1:], start=2):
        if run.tokens != runs[0].tokens or run.text != runs[0].text:
            raise KitFailure(_diff_message(f"temperature 0 is not deterministic (run 1 vs {n})",
                                           runs[0], run))
    return runs


def check_max_tokens(server: ServerLike, *, cases: Sequence[int] = MAX_TOKENS_CASES,
                     ignore_eos: bool | None = None) -> None:
    """Each ``max_tokens`` is honoured: exactly, with finish_reason "length", when EOS is
    ignored; otherwise never exceeded, and exact whenever the engine says "length"."""
    extra = _extra(server, ignore_eos)
    rows = []
    with client_for(server) as c:
        for n in cases:
            got = greedy(c, PROMPT, n, extra)[0]
            rows.append((n, got.completion_tokens, len(got.tokens), got.finish_reason))
    print("max_tokens  usage  logprob_tokens  finish_reason" + ("  (ignore_eos)" if extra else ""))
    for row in rows:
        print(f"{row[0]:>10}  {row[1]:>5}  {row[2]:>14}  {row[3]}")
    for n, used, listed, finish in rows:
        if used != listed:
            raise KitFailure(f"max_tokens={n}: usage says {used} completion tokens but "
                             f"logprobs list {listed}")
        if used > n:
            raise KitFailure(f"max_tokens={n} exceeded: {used} tokens generated")
        if extra and (used != n or finish != "length"):
            raise KitFailure(f"max_tokens={n} with ignore_eos gave {used} tokens, "
                             f"finish_reason {finish!r} (expected {n}, 'length')")
        if finish == "length" and used != n:
            raise KitFailure(f"max_tokens={n}: finish_reason 'length' after only {used} tokens")


def check_batch_equals_singles(server: ServerLike, *, prompts: Sequence[str] = PROMPTS,
                               max_tokens: int = BATCH_TOKENS,
                               ignore_eos: bool | None = None) -> None:
    """A list of N prompts in one request decodes each exactly as N single requests do."""
    if len(prompts) < 2:
        raise ValueError("a batch needs at least 2 prompts")
    extra = _extra(server, ignore_eos)
    with client_for(server) as c:
        batch = greedy(c, list(prompts), max_tokens, extra)
        singles = [greedy(c, p, max_tokens, extra)[0] for p in prompts]
    print(f"batch of {len(prompts)} vs singles, {max_tokens} tokens each")
    for i, (b, s) in enumerate(zip(batch, singles)):
        same = b.tokens == s.tokens and b.text == s.text
        print(f"  prompt {i}: {'same' if same else 'DIFFERENT'}  {s.text[:40]!r}")
    for i, (b, s) in enumerate(zip(batch, singles)):
        if b.tokens != s.tokens or b.text != s.text:
            raise KitFailure(_diff_message(f"prompt {i} decodes differently in a batch of "
                                           f"{len(prompts)} than alone", s, b))


def check_decode(server: ServerLike) -> None:
    """All decode checks with their defaults."""
    check_greedy_deterministic(server)
    check_max_tokens(server)
    check_batch_equals_singles(server)
