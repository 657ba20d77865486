"""A fake OpenAI-compatible engine, in-process, for testing the kits themselves.

It serves /health, /v1/models, /v1/completions, /v1/chat/completions (with SSE
streaming) and /metrics on 127.0.0.1 port 0, from a ThreadingHTTPServer in a
daemon thread. It is well-behaved by default; each field of :class:`Knobs`
makes it misbehave in one way a kit must catch (metrics off, a gauge missing,
NaN samples, one bad rank, nondeterministic tokens, a stream without [DONE],
usage that lies, 5xx on bad input, ...). Knobs may be changed while it runs.

Tokens are whitespace-delimited words (" t123"), so counts are easy to check.
"""
from __future__ import annotations

import json
import math
import random
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ci.engine.backends.spec import BackendSpec, Gauges
from ci.engine.backends.vllm import VLLM_STEP_TIMER

MODEL = "fake-model"
# serve_forever checks for shutdown this often; the default 0.5 s would add
# half a second to every test that closes a fake.
SHUTDOWN_POLL_S = 0.01
# busy_duty's cycle: short against the kits' scrape intervals, so scrapes land
# at effectively random phases.
DUTY_PERIOD_S = 0.007
VOCAB = 5000
# Per-token logprobs of the fake's scoring: the preferred ending scores much
# better than the others, so its accuracy is exactly the knob's value.
_GOOD_LOGPROB = -0.5
_BAD_LOGPROB = -9.0
_CONTEXT_LOGPROB = -2.0
# Generated positions: the chosen token's logprob, and how far each runner-up
# of the top-k list trails the one before it (far beyond any tie margin).
_GEN_LOGPROB = -1.0
_RUNNER_UP_GAP = 2.0

_PREFIX = "fake:"
FAKE_GAUGES = Gauges(
    running=_PREFIX + "num_requests_running",
    waiting=_PREFIX + "num_requests_waiting",
    generation_tokens=_PREFIX + "generation_tokens_total",
    prompt_tokens=_PREFIX + "prompt_tokens_total",
    occupancy=_PREFIX + "fwd_occupancy",
    kv_usage=_PREFIX + "kv_cache_usage_perc",
    spec_accept_length=_PREFIX + "spec_accept_length",
    requests=_PREFIX + "request_success_total",
)


def _no_argv(model: str, port: int, tp: int, args) -> list[str]:
    raise RuntimeError("the fake engine runs in-process; it is never launched")


# sglang-like: a ratio occupancy gauge and a flag that turns metrics on.
FAKE_BACKEND = BackendSpec(name="fake", argv=_no_argv, metrics_prefix=_PREFIX,
                           gauges=FAKE_GAUGES, metrics_flag="--enable-metrics")
# vLLM-like: no occupancy gauge of its own, the running count stands in.
FAKE_VLLM_LIKE = BackendSpec(
    name="fake-vllm-like", argv=_no_argv, metrics_prefix=_PREFIX,
    gauges=Gauges(**{**FAKE_GAUGES.__dict__, "occupancy": FAKE_GAUGES.running,
                     "spec_accept_length": None}),
    step_timer=VLLM_STEP_TIMER)


@dataclass
class Knobs:
    """How the fake misbehaves; the defaults are a well-behaved engine."""

    metrics_enabled: bool = True
    missing_metrics: frozenset[str] = frozenset()  # series names left out of /metrics
    nan_gauges: bool = False  # every gauge sample reads NaN
    ranks: int = 1  # label sets engine="0".."ranks-1"
    bad_rank: int | None = None  # this rank's running/occupancy gauges stay 0
    occupancy: float = 0.99  # fwd_occupancy while a request runs
    spec_accept_length: float | None = None
    deterministic: bool = True
    token_delay_s: float = 0.0  # sleep per generated token (to make requests last)
    stream_done: bool = True  # end streams with data: [DONE]
    malformed_chunk: bool = False  # put one non-JSON data line in each stream
    usage_skew: int = 0  # added to reported completion_tokens
    bad_request_status: int | None = None  # status for invalid requests (None: 400)
    counter_skew: int = 0  # added to the generation counter per request
    stuck_running: bool = False  # running gauge never returns to 0
    extra_tokens: int = 0  # generate max_tokens + extra, still "length"
    batch_differs: bool = False  # a prompt list decodes differently from singles
    fail_every: int = 0  # every k-th generation request answers 500
    mc_skill: float | None = None  # fraction of accuracy items the fake gets right
    max_model_len: int = 1024
    prompt_logprob: float | None = None  # every prompt logprob reads this (NaN, 0.0, ...)
    publish_lag_s: float = 0.0  # gauges read idle until a request has run this long
    busy_duty: float = 1.0  # while running, gauges read busy this fraction of each cycle
    logprob_skew: float = 0.0  # added to every generated top-k logprob (a slightly wrong kernel)
    diverge_at: int | None = None  # from this position on, emit the runner-up token
    stream_differs: bool = False  # streams decode other tokens than plain requests
    stream_delay_s: float = 0.0  # pause between stream events (so a client can drop mid-way)
    leak_aborted: bool = False  # a stream the client drops keeps its running slot forever
    overlong_status: int = 400  # status for a prompt longer than max_model_len
    overlong_names_limit: bool = True  # whether that error message names the limit
    ignore_n: bool = False  # always one choice per prompt
    ignore_stop: bool = False  # stop strings are not applied
    structured_output: bool = True  # honour response_format json_schema
    json_name: str = "fake"  # the "name" of a structured answer (too long: breaks the schema's maxLength)
    # Streams as timed steps: each token takes step_s "in the model", is logged
    # to step_log the way vLLM's --enable-logging-iteration-details does, and
    # stream_delay_s after it is time *between* steps (not logged).
    step_log: Path | None = None
    step_s: float = 0.0


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    peak_active: int = 0  # most requests in flight at once (the accuracy kit's pool shows here)
    busy_since: float = 0.0  # monotonic time active went from 0 to 1
    requests: int = 0
    finished: int = 0  # requests answered in full (the request_success counter)
    # ... per data-parallel rank: the fake's "ranks" take requests in turn, as vLLM's own
    # DP load balancer spreads sequential requests.
    finished_by_rank: dict[int, int] = field(default_factory=dict)
    leaked: int = 0  # running slots of dropped streams never given back (leak_aborted)
    steps: int = 0  # timed steps logged (step_log knob)
    generation_total: float = 0.0
    prompt_total: float = 0.0
    log: list[str] = field(default_factory=list)


def tokenize(text: str) -> list[str]:
    """The fake's tokenizer: each word with its leading whitespace is one token."""
    return re.findall(r"\s*\S+", text)


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# Bounds for the fake's own request bookkeeping to settle after a response.
IDLE_TIMEOUT_S = 5.0
IDLE_POLL_S = 0.01


class FakeEngine:
    """The fake server; also a ``server``-like object the kits accept."""

    served_model = MODEL

    def __init__(self, knobs: Knobs | None = None, *, backend: BackendSpec = FAKE_BACKEND,
                 args: tuple[str, ...] = (), port: int = 0):
        self.knobs = knobs or Knobs()
        self.backend = backend
        self.args = args
        self.state = _State()
        self._mc = self._load_mc()
        engine = self

        class Handler(_Handler):
            fake = engine

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": SHUTDOWN_POLL_S},
                                        name="fake-engine", daemon=True)
        self._thread.start()
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def log_path(self) -> Path | None:
        """The fake's step log (``step_log`` knob), where a real server's log would be."""
        return self.knobs.step_log

    def step(self, position: int) -> None:
        """One timed decode step: ``step_s`` of work, then its line in the step log."""
        t0 = time.monotonic()
        time.sleep(self.knobs.step_s)
        elapsed_ms = (time.monotonic() - t0) * 1000
        with self.state.lock:
            self.state.steps += 1
            index = self.state.steps
        # The prefill step (position 0) decodes nothing, as in vLLM's lines.
        gen = 0 if position == 0 else 1
        with open(self.knobs.step_log, "a") as fh:
            fh.write(f"INFO [loggers.py:199] Iteration({index}): {1 - gen} context requests, "
                     f"{5 * (1 - gen)} context tokens, {gen} generation requests, {gen} generation "
                     f"tokens, iteration elapsed time: {elapsed_ms:.2f} ms, CPU KV cache usage: 0.1%\n")

    def wait_idle(self, timeout_s: float = IDLE_TIMEOUT_S) -> int:
        """Active requests once all have finished or ``timeout_s`` passed.

        A handler thread counts its request done just after the last byte is
        sent, so right after a client's read the count can still be 1.
        """
        deadline = time.monotonic() + timeout_s
        while self.state.active and time.monotonic() < deadline:
            time.sleep(IDLE_POLL_S)
        return self.state.active

    def close(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> "FakeEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, n: int = 50) -> str:
        """Last ``n`` request lines, like a real server's log tail."""
        with self.state.lock:
            return "\n".join(self.state.log[-n:])

    # -- accuracy oracle ----------------------------------------------------
    def _load_mc(self) -> dict[str, tuple[str, bool]]:
        """context -> (gold ending, whether the fake 'knows' this item)."""
        from ci.kits.accuracy import load_dataset

        items = load_dataset()
        known = round((self.knobs.mc_skill or 0.0) * len(items))
        return {it.context: (it.endings[it.label], i < known) for i, it in enumerate(items)}

    def prompt_logprobs(self, prompt: str) -> list[float | None]:
        """Per-token logprobs of ``prompt`` (first token None, as engines report)."""
        toks = tokenize(prompt)
        values: list[float | None] = [_CONTEXT_LOGPROB] * len(toks)
        for context, (gold, known) in self._mc.items():
            if prompt.startswith(context) and len(prompt) > len(context):
                ending = prompt[len(context):].strip()
                is_gold = ending == gold
                per_tok = _GOOD_LOGPROB if is_gold == known else _BAD_LOGPROB
                # A per-ending jitter so the non-preferred endings never tie.
                per_tok -= (zlib.crc32(ending.encode()) % 97) / 1000.0
                n_ctx = len(tokenize(context))
                values[n_ctx:] = [per_tok] * (len(toks) - n_ctx)
                break
        if self.knobs.prompt_logprob is not None:
            values = [self.knobs.prompt_logprob] * len(toks)
        if values:
            values[0] = None
        return values

    # -- generation ---------------------------------------------------------
    def top_logprobs(self, tokens: list[str], k: int) -> list[dict[str, float]]:
        """Each generated position's top-``k`` (the knobs' skew and divergence applied)."""
        out = []
        for i, tok in enumerate(tokens):
            top = {t: v + self.knobs.logprob_skew for t, v in top_k_of(tok, k).items()}
            if self.knobs.diverge_at is not None and i >= self.knobs.diverge_at:
                # The emitted token is the runner-up; the list names what it was.
                top = {t: v + self.knobs.logprob_skew for t, v in top_k_of(_base(tok), k).items()}
            out.append(top)
        return out

    def generate(self, prompt: str, max_tokens: int, salt: str = "") -> list[str]:
        """The tokens the fake 'decodes' for ``prompt``, sleeping per token if asked."""
        n = max(0, max_tokens + self.knobs.extra_tokens)
        if self.knobs.deterministic:
            rng = random.Random(zlib.crc32((salt + prompt).encode()))
        else:
            rng = random.Random()
        out = []
        for _ in range(n):
            if self.knobs.token_delay_s:
                time.sleep(self.knobs.token_delay_s)
            tok = f" t{rng.randrange(VOCAB)}"
            if self.knobs.diverge_at is not None and len(out) >= self.knobs.diverge_at:
                tok = _runner_up(tok)
            out.append(tok)
        return out

    def metrics_text(self) -> str:
        """The Prometheus exposition the fake serves right now."""
        k, st = self.knobs, self.state
        with st.lock:
            active, gen, prompt = st.active + st.leaked, st.generation_total, st.prompt_total
            since, finished = st.busy_since, dict(st.finished_by_rank)
        now = time.monotonic()
        if active and (now - since < k.publish_lag_s
                       or (now % DUTY_PERIOD_S) / DUTY_PERIOD_S >= k.busy_duty):
            active = 0  # the engine is (or reports itself) idle right now
        busy = active > 0 or k.stuck_running
        running = max(active, 1 if k.stuck_running else 0)
        series: dict[str, tuple[str, list[tuple[int, float]]]] = {}
        ranks = range(max(1, k.ranks))

        def per_rank(value: float) -> list[tuple[int, float]]:
            return [(r, 0.0 if r == k.bad_rank else value) for r in ranks]

        series[FAKE_GAUGES.running] = ("gauge", per_rank(float(running)))
        series[FAKE_GAUGES.waiting] = ("gauge", [(r, 0.0) for r in ranks])
        series[FAKE_GAUGES.occupancy] = ("gauge", per_rank(k.occupancy if busy else 0.0))
        series[FAKE_GAUGES.kv_usage] = ("gauge", per_rank(0.01 * running))
        if k.spec_accept_length is not None:
            series[FAKE_GAUGES.spec_accept_length] = ("gauge", per_rank(k.spec_accept_length))
        series[FAKE_GAUGES.generation_tokens] = ("counter", [(0, gen)])
        series[FAKE_GAUGES.requests] = ("counter", [(r, float(finished.get(r, 0))) for r in ranks])
        series[FAKE_GAUGES.prompt_tokens] = ("counter", [(0, prompt)])
        lines = []
        for name, (kind, values) in series.items():
            if name in k.missing_metrics:
                continue
            lines += [f"# HELP {name} fake {kind}", f"# TYPE {name} {kind}"]
            for rank, value in values:
                if k.nan_gauges and kind == "gauge":
                    value = math.nan
                text = "NaN" if math.isnan(value) else repr(float(value))
                lines.append(f'{name}{{engine="{rank}",model_name="{MODEL}"}} {text}')
        return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    fake: FakeEngine

    def log_message(self, fmt: str, *args: Any) -> None:
        with self.fake.state.lock:
            self.fake.state.log.append(fmt % args)

    # -- plumbing -----------------------------------------------------------
    def _send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": {"message": message, "code": status}})

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        fake = self.fake
        if self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": MODEL, "object": "model", "max_model_len": fake.knobs.max_model_len}]})
        elif self.path == "/metrics" and fake.knobs.metrics_enabled:
            body = fake.metrics_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            try:
                body = json.loads(raw)
            except ValueError:
                raise _BadRequest(400, "body is not JSON") from None
            if not isinstance(body, dict):
                raise _BadRequest(400, "body must be an object")
            if self.path == "/v1/completions":
                prompts = body.get("prompt")
                if isinstance(prompts, str):
                    prompts = [prompts]
                if not isinstance(prompts, list) or not prompts or not all(
                        isinstance(p, str) and p for p in prompts):
                    raise _BadRequest(400, "prompt must be a non-empty string or list of strings")
                chat = False
            elif self.path == "/v1/chat/completions":
                msgs = body.get("messages")
                if not isinstance(msgs, list) or not msgs or not all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
                    raise _BadRequest(400, "messages must be a non-empty list of {role, content}")
                prompts = ["".join(" " + m["content"] for m in msgs)]
                chat = True
            else:
                raise _BadRequest(404, f"no route {self.path}")
            params = self._validate(body)
            self._check_context(prompts)
        except _BadRequest as exc:
            status = (exc.status if exc.status != 400
                      else (fake.knobs.bad_request_status or 400))
            self._error(status, str(exc))
            return
        with fake.state.lock:
            fake.state.requests += 1
            nth = fake.state.requests
        if fake.knobs.fail_every and nth % fake.knobs.fail_every == 0:
            self._error(500, "injected failure")
            return
        with fake.state.lock:
            if fake.state.active == 0:
                fake.state.busy_since = time.monotonic()
            fake.state.active += 1
            fake.state.peak_active = max(fake.state.peak_active, fake.state.active)
        try:
            if body.get("stream"):
                self._stream(prompts[0], params, chat, body)
            else:
                self._complete(prompts, params, chat, body)
        finally:
            with fake.state.lock:
                fake.state.active -= 1

    def _validate(self, body: dict) -> dict:
        model = body.get("model", MODEL)
        if model != MODEL:
            raise _BadRequest(404, f"model {model!r} does not exist")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise _BadRequest(400, "max_tokens must be a non-negative integer")
        if max_tokens == 0 and not body.get("echo"):
            raise _BadRequest(400, "max_tokens must be at least 1")
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise _BadRequest(400, "temperature must be >= 0")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise _BadRequest(400, "n must be a positive integer")
        fmt = body.get("response_format") or {}
        return {"max_tokens": max_tokens, "logprobs": body.get("logprobs"),
                "echo": bool(body.get("echo")), "n": 1 if self.fake.knobs.ignore_n else n,
                "stop": [] if self.fake.knobs.ignore_stop else stop,
                "json": fmt.get("type") == "json_schema" and self.fake.knobs.structured_output}

    def _check_context(self, prompts: list[str]) -> None:
        k = self.fake.knobs
        longest = max(len(tokenize(p)) for p in prompts)
        if longest > k.max_model_len:
            detail = (f"maximum context length is {k.max_model_len} tokens, the prompt has "
                      f"{longest}" if k.overlong_names_limit else "prompt too long")
            raise _BadRequest(k.overlong_status, detail)

    def _count(self, prompt_tokens: int, completion_tokens: int) -> None:
        st = self.fake.state
        with st.lock:
            st.prompt_total += prompt_tokens
            st.generation_total += completion_tokens + self.fake.knobs.counter_skew
            knobs = self.fake.knobs
            serving = [r for r in range(max(1, knobs.ranks)) if r != knobs.bad_rank] or [0]
            rank = serving[st.finished % len(serving)]  # a bad rank gets no requests either
            st.finished_by_rank[rank] = st.finished_by_rank.get(rank, 0) + 1
            st.finished += 1

    def _choice(self, index: int, prompt: str, toks: list[str], params: dict, chat: bool) -> dict:
        finish = "length"
        text = "".join(toks)
        cuts = [text.find(s) for s in params["stop"] if s and text.find(s) >= 0]
        if cuts:
            text, finish = text[:min(cuts)], "stop"
        if chat:
            if params["json"]:
                text = json.dumps({"name": self.fake.knobs.json_name, "count": len(toks)})
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "finish_reason": finish}
        logprobs = None
        if params["logprobs"] is not None:
            tops = self.fake.top_logprobs(toks, max(1, int(params["logprobs"])))
            all_toks, values = list(toks), [top.get(t, _GEN_LOGPROB) for t, top in zip(toks, tops)]
            prompt_tops: list[dict | None] = []
            if params["echo"]:
                all_toks = tokenize(prompt) + all_toks
                prompt_values = self.fake.prompt_logprobs(prompt)
                prompt_tops = [None if v is None else {t: v}
                               for t, v in zip(tokenize(prompt), prompt_values)]
                values = prompt_values + values
                text = prompt + text
            offsets, pos = [], 0
            for t in all_toks:
                offsets.append(pos)
                pos += len(t)
            logprobs = {"tokens": all_toks, "token_logprobs": values, "text_offset": offsets,
                        "top_logprobs": prompt_tops + tops}
        elif params["echo"]:
            text = prompt + text
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _complete(self, prompts: list[str], params: dict, chat: bool, body: dict) -> None:
        fake = self.fake
        choices, n_prompt, n_gen = [], 0, 0
        batch_salt = "batch" if fake.knobs.batch_differs and len(prompts) > 1 else ""
        for prompt in prompts:
            n_prompt += len(tokenize(prompt))
            for j in range(params["n"]):
                # Each of n choices samples its own tokens; the first is the plain one.
                salt = batch_salt + (f"choice{j}" if j else "")
                toks = fake.generate(prompt, params["max_tokens"], salt=salt)
                choices.append(self._choice(len(choices), prompt, toks, params, chat))
                n_gen += len(toks)
        self._count(n_prompt, n_gen)
        reported = n_gen + fake.knobs.usage_skew
        self._send_json(200, {
            "id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": MODEL, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": reported,
                      "total_tokens": n_prompt + reported}})

    def _stream(self, prompt: str, params: dict, chat: bool, body: dict) -> None:
        fake = self.fake
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        obj = "chat.completion.chunk" if chat else "text_completion"
        toks = fake.generate(prompt, params["max_tokens"],
                             salt="stream" if fake.knobs.stream_differs else "")
        for i, tok in enumerate(toks):
            if fake.knobs.step_log is not None:
                fake.step(i)
            last = i == len(toks) - 1
            choice: dict[str, Any] = ({"index": 0, "delta": {"content": tok}} if chat
                                      else {"index": 0, "text": tok})
            choice["finish_reason"] = "length" if last else None
            try:
                event({"id": "cmpl-fake", "object": obj, "model": MODEL, "choices": [choice]})
            except (BrokenPipeError, ConnectionResetError):
                # The client went away mid-stream: a real engine aborts the request.
                if fake.knobs.leak_aborted:
                    with fake.state.lock:
                        fake.state.leaked += 1
                return
            if fake.knobs.malformed_chunk and i == 0:
                event("{not json")
            if fake.knobs.stream_delay_s:
                time.sleep(fake.knobs.stream_delay_s)
        n_prompt = len(tokenize(prompt))
        self._count(n_prompt, len(toks))
        if (body.get("stream_options") or {}).get("include_usage"):
            reported = len(toks) + fake.knobs.usage_skew
            event({"id": "cmpl-fake", "object": obj, "model": MODEL, "choices": [],
                   "usage": {"prompt_tokens": n_prompt, "completion_tokens": reported,
                             "total_tokens": n_prompt + reported}})
        if fake.knobs.stream_done:
            event("[DONE]")


def top_k_of(token: str, k: int) -> dict[str, float]:
    """The fake model's top-``k`` at a position whose greedy token is ``token``."""
    n = int(token.strip()[1:])
    return {(token if j == 0 else f" t{(n + j) % VOCAB}"): _GEN_LOGPROB - _RUNNER_UP_GAP * j
            for j in range(k)}


def _runner_up(token: str) -> str:
    return f" t{(int(token.strip()[1:]) + 1) % VOCAB}"


def _base(runner_up: str) -> str:
    return f" t{(int(runner_up.strip()[1:]) - 1) % VOCAB}"


class FakeReference:
    """The reference kit's independent decoder of the fake's 'weights': what a
    well-behaved fake engine computes, derived without asking the engine."""

    def __init__(self) -> None:
        self._model = FakeEngine.__new__(FakeEngine)  # its decode rules, no server
        self._model.knobs = Knobs()

    def greedy(self, prompt: str, n_tokens: int, top_k: int):
        from ci.kits.reference import Decode, Step

        toks = self._model.generate(prompt, n_tokens)
        return Decode(prompt, tuple(Step(t, _GEN_LOGPROB, top_k_of(t, top_k)) for t in toks))


def fake_engine(backend: BackendSpec = FAKE_BACKEND, args: tuple[str, ...] = (),
                **knobs: Any) -> FakeEngine:
    """A running FakeEngine with the given knobs; use it as a context manager."""
    return FakeEngine(Knobs(**knobs), backend=backend, args=args)


def main(argv: list[str] | None = None) -> int:
    """Serve as a process of its own until SIGTERM: ``python -m tests.fakes.openai_engine --port P
    [--knobs JSON]`` -- a worker behind a real gateway, under kiln's supervisor."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--knobs", default="{}", help="Knobs fields as a JSON object")
    a, _engine_args = ap.parse_known_args(argv)  # launch args meant for a real engine (--enable-metrics)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeEngine(Knobs(**json.loads(a.knobs)), port=a.port) as fake:
        print(f"fake engine serving on {fake.base_url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
