"""Make untrusted text (server logs, test output) safe to publish as Markdown.

A PR comment and a job summary are public. What goes into them from a log passes
three filters, in this order (``sanitize``):

1. ``clean``: ANSI escapes, control bytes, bidi overrides and binary junk go;
   carriage-return progress bars collapse to what the terminal last showed;
2. ``Redactor.redact``: values of environment variables whose names look secret
   (and explicitly configured ones) become ``***`` — before and after cleaning,
   so a token split by a colour code is still caught;
3. ``neutralize``: ``@name`` and ``<tag`` get a zero-width space after the first
   character, so a log can neither ping people nor inject HTML into the comment.

Plus the Markdown containers untrusted text is ever put in: ``fence`` (a code
block no content can close), ``code_span`` (one inline line) and ``html_text``;
and ``read_log_tail``, which reads only the end of a log (a 50 MB log is one
seek and one bounded read) and returns publishable lines.
"""
from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import quote
from ci.text import ansi, logtail

REDACTED = "***"
ZWSP = "\u200b"

# Values shorter than this in secret-named variables are flags ("1", "true",
# "none"), not credentials; redacting them would shred every log line that
# contains "true". Real tokens and passwords are longer.
MIN_SECRET_LEN = 8
# Secrets configured explicitly are trusted to be secrets even when short, but a
# 1-3 character value would garble the whole report.
MIN_EXTRA_SECRET_LEN = 4
# Comma-separated names of extra variables whose values must be redacted, for
# credentials whose variable name does not look secret (e.g. REGISTRY_LOGIN).
EXTRA_SECRET_VARS_ENV = "KILN_SECRET_VARS"

# A variable name containing one of these anywhere is secret (HF_TOKEN,
# AWS_SECRET_ACCESS_KEY, DBPASSWORD). Long words: substring matches are safe.
_SECRET_SUBSTRINGS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE",
                      "APIKEY", "COOKIE", "SESSIONID")
# Short words match only as a whole ``_``-separated part: KEY matches
# OPENAI_API_KEY but not MONKEY_PATCH; PWD is absent on purpose (it is the cwd).
_SECRET_PARTS = frozenset({"KEY", "PASS", "AUTH", "PAT", "CREDS", "SIG", "SIGNATURE", "BEARER"})
# Named like secrets but known not to be: redacting a socket path only adds noise.
_NOT_SECRET = frozenset({"SSH_AUTH_SOCK", "KEYTIMEOUT"})

# Token shapes caught even when they come from a file rather than the
# environment: GitHub, Hugging Face, bearer headers, passwords in URLs.
_TOKEN_SHAPES = (
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}\b"),
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    re.compile(r"(?i)(?<=\bbearer )[A-Za-z0-9._~+/=-]{16,}"),
    re.compile(r"(?<=://)([^/\s:@]+):[^/\s@]{3,}(?=@)"),
)

# Control bytes (bar tab/newline/CR), DEL, C1 controls, bidi overrides (which can
# reorder how a comment reads), and the replacement character from undecodable
# bytes: each run becomes one visible marker.
_JUNK = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ufffd]+")
JUNK_MARK = "\ufffd"
# Nobody reads more than a few screens of a log in a comment; the whole log stays
# on the runner (reports/logs/), unredacted, so it is not uploaded.
MAX_SECTION_LINES = 300
# Only this much is read from the end of a log: a 50 MB log costs one seek and
# one 512 KiB read, and 300 lines of 500 characters still fit.
TAIL_BYTES = 512 * 1024
# One minified JSON line or base64 blob must not eat the whole budget.
MAX_LINE_CHARS = 500
_MENTION = re.compile(r"@(?=[A-Za-z0-9_])")
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")


def is_secret_name(name: str) -> bool:
    """True when an environment variable called ``name`` probably holds a credential."""
    upper = name.upper()
    if upper in _NOT_SECRET:
        return False
    if any(word in upper for word in _SECRET_SUBSTRINGS):
        return True
    return any(part in _SECRET_PARTS for part in re.split(r"[_\-.]", upper))


def secret_values(env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """Every value to redact, longest first (so a secret containing another goes whole).

    From ``env`` (default ``os.environ``): values of secret-named variables of at
    least MIN_SECRET_LEN characters, and of the variables listed in
    ``$KILN_SECRET_VARS``; plus ``extra`` values of at least MIN_EXTRA_SECRET_LEN.
    URL-encoded forms are included because registries and proxies log URLs.
    """
    env = os.environ if env is None else env
    listed = {n.strip() for n in env.get(EXTRA_SECRET_VARS_ENV, "").split(",") if n.strip()}
    found: set[str] = set()
    for name, value in env.items():
        if name in listed and len(value) >= MIN_EXTRA_SECRET_LEN:
            found.add(value)
        elif is_secret_name(name) and len(value) >= MIN_SECRET_LEN:
            found.add(value)
    found.update(v for v in extra if v and len(v) >= MIN_EXTRA_SECRET_LEN)
    # A log tail can start inside a multi-line secret (a PEM key): each of its
    # lines must be caught on its own.
    found.update(ln.strip() for v in list(found) if "\n" in v for ln in v.splitlines()
                 if len(ln.strip()) >= MIN_SECRET_LEN)
    variants = {quote(v, safe="") for v in found} | {quote(v) for v in found}
    return tuple(sorted(found | variants, key=lambda v: (-len(v), v)))


class Redactor:
    """Replaces known secret values and well-known token shapes with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()):
        # Values shorter than REDACTED are dropped so redaction never lengthens
        # text: the report measures its size before redacting.
        values = sorted({s for s in secrets if len(s) >= len(REDACTED)}, key=lambda v: (-len(v), v))
        self._count = len(values)
        self._pattern = re.compile("|".join(map(re.escape, values))) if values else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, extra: Iterable[str] = ()) -> "Redactor":
        """A redactor for the secrets visible in ``env`` plus ``extra`` (see secret_values)."""
        return cls(secret_values(env, extra))

    def __len__(self) -> int:
        return self._count

    def redact(self, text: str) -> str:
        """``text`` with every secret value and token shape replaced by REDACTED."""
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
        for shape in _TOKEN_SHAPES:
            if shape.groups:
                text = shape.sub(lambda m: m.group(1) + ":" + REDACTED, text)
            else:
                text = shape.sub(REDACTED, text)
        return text


def _resolve_cr(line: str) -> str:
    # A terminal shows what was written after the last carriage return; progress
    # bars write hundreds of frames per line and only the final one matters.
    line = line.rstrip("\r")
    if "\r" not in line:
        return line
    frames = [f for f in line.split("\r") if f]
    return frames[-1] if frames else ""


def clean(text: str) -> str:
    """Strip ANSI escapes and control bytes, collapse binary junk, resolve ``\\r``."""
    text = ansi.strip(text)
    lines = [_resolve_cr(line) for line in text.split("\n")]
    return _JUNK.sub(JUNK_MARK, "\n".join(lines))


def neutralize(text: str) -> str:
    """Break ``@mentions`` and HTML tag openings with a zero-width space.

    The text looks the same but GitHub neither notifies ``@someone`` nor parses
    ``<script>`` / ``<details>`` / ``<!--`` as markup, even if it escapes a code block.
    """
    return _TAG_OPEN.sub("<" + ZWSP, _MENTION.sub("@" + ZWSP, text))


def sanitize(text: str, redactor: Redactor) -> str:
    """clean + redact (before and after cleaning) + neutralize: log text made publishable."""
    return neutralize(redactor.redact(clean(redactor.redact(text))))


def decode(data: bytes) -> str:
    """Bytes from a log as text; undecodable bytes become markers instead of an error."""
    return data.decode("utf-8", errors="replace")


def _longest_run(text: str, char: str) -> int:
    runs = re.findall(re.escape(char) + "+", text)
    return max((len(r) for r in runs), default=0)


def fence(text: str, info: str = "text") -> str:
    """A fenced code block that no line of ``text`` can close early.

    CommonMark closes a fence only with a run of the same character at least as
    long as the opening one, so the fence is one backtick longer than any run inside.
    """
    ticks = "`" * max(3, _longest_run(text, "`") + 1)
    body = text if text.endswith("\n") or not text else text + "\n"
    return f"{ticks}{info}\n{body}{ticks}"


def code_span(text: str) -> str:
    """One line of untrusted text as inline code (no Markdown, no HTML, no mention)."""
    one_line = " ".join(neutralize(text).split())
    ticks = "`" * (_longest_run(one_line, "`") + 1)
    pad = " " if one_line.startswith("`") or one_line.endswith("`") else ""
    return f"{ticks}{pad}{one_line}{pad}{ticks}"


def html_text(text: str) -> str:
    """One line of untrusted text for an HTML context such as ``<summary>``."""
    return html.escape(" ".join(neutralize(text).split()), quote=False)


@dataclass(frozen=True)
class Tail:
    """The last lines of a log, already sanitised, and where they came from."""

    lines: tuple[str, ...]
    source: str


def _cap_line(line: str) -> str:
    if len(line) <= MAX_LINE_CHARS:
        return line
    return f"{line[:MAX_LINE_CHARS]} … [{len(line) - MAX_LINE_CHARS} chars cut]"


def sanitize_lines(text: str, redactor: Redactor, max_lines: int = MAX_SECTION_LINES) -> tuple[str, ...]:
    """The last ``max_lines`` lines of ``text``, cleaned, redacted, neutralised and capped.

    Redaction runs on whole lines before they are shortened, so a cut can never
    leave half a secret behind.
    """
    if max_lines <= 0:
        return ()
    # Sanitising keeps the line count (no escape spans a newline), so only the
    # lines that will be shown need the work: a 100k-line traceback costs 300.
    raw = text.split("\n")
    if raw and not raw[-1]:
        raw.pop()
    lines = sanitize("\n".join(raw[-max_lines:]), redactor).split("\n") if raw else []
    return tuple(_cap_line(line) for line in lines)


def read_log_tail(path: str | Path, redactor: Redactor, max_lines: int = MAX_SECTION_LINES,
                  max_bytes: int = TAIL_BYTES) -> Tail:
    """The sanitised last lines of the log at ``path``, reading only its last ``max_bytes``."""
    path = Path(path)
    try:
        data, size = logtail.read_end(path, max_bytes)
    except OSError as exc:
        return Tail((), f"log {path} unreadable: {exc.strerror or exc}")
    start = size - len(data)
    text = decode(data)
    if start > 0:
        # The first line read is a fragment that may start mid-secret: drop it.
        # One enormous line has no newline to cut at; cut at the first space.
        newline = text.find("\n")
        cut = re.search(r"\s", text) if newline < 0 else None
        text = text[newline + 1:] if newline >= 0 else (text[cut.end():] if cut else "")
    lines = sanitize_lines(text, redactor, max_lines)
    where = f"last {len(lines)} lines of {path}"
    if start > 0:
        where += f" (a {size / 1e6:.1f} MB log; only its last {max_bytes // 1024} KiB read)"
    return Tail(lines, where)
