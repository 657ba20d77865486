"""Sanitising untrusted log text: secrets, ANSI/binary junk, @mentions, HTML, fences, tails."""
from __future__ import annotations

import tracemalloc

import pytest

from ci.text import redact
from ci.text.redact import REDACTED, ZWSP, Redactor

TOKEN = "ghs_" + "A1b2C3d4" * 5  # 44 chars, shaped like a GitHub token


@pytest.mark.parametrize("name,secret", [
    ("GITHUB_TOKEN", True), ("HF_TOKEN", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("OPENAI_API_KEY", True), ("DOCKER_PASSWORD", True), ("REGISTRY_PASS", True),
    ("NPM_AUTH", True), ("GH_PAT", True), ("GOOGLE_APPLICATION_CREDENTIALS", True),
    ("dbpassword", True), ("MY_PRIVATE_THING", True),
    ("PATH", False), ("PWD", False), ("HOME", False), ("MONKEY_PATCH", False),
    ("SSH_AUTH_SOCK", False), ("CUDA_VISIBLE_DEVICES", False), ("KILN_PROFILE", False),
    ("PATHEXT", False), ("KEYBOARD_LAYOUT", False),
])
def test_secret_names(name, secret):
    assert redact.is_secret_name(name) is secret


def test_secret_values_lengths_extra_vars_and_url_forms():
    env = {"HF_TOKEN": "hf-value/with:chars", "FLAG_TOKEN": "true", "HOME": "/root-long-path",
           "REGISTRY_LOGIN": "loginvalue", "KILN_SECRET_VARS": "REGISTRY_LOGIN, OTHER"}
    values = redact.secret_values(env, extra=["xyz", "abcd"])
    assert "hf-value/with:chars" in values
    assert "hf-value%2Fwith%3Achars" in values  # URL-encoded form, as proxies log it
    assert "loginvalue" in values  # listed by name in KILN_SECRET_VARS
    assert "true" not in values  # too short to be a credential
    assert "/root-long-path" not in values  # HOME does not look secret
    assert "abcd" in values and "xyz" not in values  # explicit extras: >= 4 chars
    assert list(values) == sorted(values, key=lambda v: (-len(v), v))  # longest first


def test_multiline_secret_lines_are_redacted_one_by_one():
    pem = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKB\n-----END KEY-----"
    r = Redactor.from_env({"DEPLOY_PRIVATE_KEY": pem})
    # A log tail that starts in the middle of the key still shows none of it.
    assert r.redact("BKcwggSjAgEAAoIBAQC7VJTUt9Us8cKB\n-----END KEY-----") == f"{REDACTED}\n{REDACTED}"


def test_redactor_replaces_every_occurrence_and_longest_first():
    r = Redactor(["secretvalue", "secretvalue-extended"])
    out = r.redact("a secretvalue-extended b secretvalue c secretvalue")
    assert out == f"a {REDACTED} b {REDACTED} c {REDACTED}"
    assert len(r) == 2


def test_redactor_token_shapes_without_env():
    r = Redactor()
    text = (f"push with {TOKEN} and hf_{'x' * 34}; Authorization: Bearer abc.def-ghi_jkl123456 "
            "url https://user:hunter22@registry.local/v2/")
    out = r.redact(text)
    assert TOKEN not in out and "hf_xxxx" not in out
    assert "abc.def-ghi_jkl123456" not in out and "hunter22" not in out
    assert "https://user:***@registry.local/v2/" in out


def test_clean_strips_ansi_controls_binary_and_resolves_carriage_returns():
    text = ("\x1b[31mred\x1b[0m plain\x1b]0;window title\x07 \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\\n"
            "progress 10%\rprogress 50%\rprogress 100%\r\n"
            "bin \x00\x01\x02\x7f\ufffd\ufffd end\n"
            "bidi \u202eevil\u202c ok\n"
            "junit #x1B[31mred#x1B[0m")
    out = redact.clean(text)
    assert "\x1b" not in out and "window title" not in out
    lines = out.split("\n")
    assert lines[0] == "red plain link"
    assert lines[1] == "progress 100%"
    assert lines[2] == f"bin {redact.JUNK_MARK} end"
    assert "\u202e" not in lines[3] and "evil" in lines[3]
    assert lines[4] == "junit red"  # pytest's JUnit writer spells ESC as #x1B


def test_sanitize_catches_a_token_split_by_colour_codes():
    r = Redactor([TOKEN])
    split = TOKEN[:10] + "\x1b[1m" + TOKEN[10:]
    assert TOKEN[10:] not in redact.sanitize(f"token={split}", r)


def test_neutralize_mentions_and_html():
    out = redact.neutralize("ping @someone and @org/team; <script>alert(1)</script> <!-- x --> a<b 3 < 4 me@x.io")
    assert "@someone" not in out and "@org" not in out
    assert "<script>" not in out and "</script>" not in out and "<!--" not in out
    assert out.replace(ZWSP, "") == "ping @someone and @org/team; <script>alert(1)</script> <!-- x --> a<b 3 < 4 me@x.io"
    assert "3 < 4" in out  # a lone '<' is not markup and stays as is


def test_fence_cannot_be_closed_by_content():
    body = "before\n```\n````\nafter"
    block = redact.fence(body)
    opening = block.split("\n", 1)[0]
    assert opening == "`````text"
    assert block.endswith("\n`````")
    assert body in block


def test_code_span_is_one_line_and_survives_backticks():
    span = redact.code_span("a `b` c\nd")
    assert span == "``a `b` c d``"
    assert redact.code_span("`edge`") == "`` `edge` ``"


def test_html_text_escapes():
    assert redact.html_text("<b> & @x") == f"&lt;{ZWSP}b&gt; &amp; @{ZWSP}x"


def test_sanitize_lines_caps_lines_and_long_lines():
    r = Redactor()
    text = "\n".join(f"line {i}" for i in range(1000)) + "\n" + "y" * 5000 + "\n"
    lines = redact.sanitize_lines(text, r, max_lines=300)
    assert len(lines) == 300
    assert lines[-1].startswith("y" * redact.MAX_LINE_CHARS) and "chars cut" in lines[-1]
    assert lines[0] == "line 701"


def test_long_line_cut_never_leaves_half_a_secret():
    secret = "S3cr3t-" + "Q" * 40
    r = Redactor([secret])
    line = "x" * (redact.MAX_LINE_CHARS - 10) + secret
    (out,) = redact.sanitize_lines(line, r)
    assert "S3cr3t" not in out and "QQQQ" not in out


def test_read_log_tail_reads_only_the_end_of_a_50mb_log(tmp_path):
    secret = "tok-" + "Z" * 40
    r = Redactor([secret])
    log = tmp_path / "server.log"
    with log.open("wb") as fh:
        chunk = (b"INFO filler line of a busy engine log with some words\n" * 20000)
        while fh.tell() < 50 * 1024 * 1024:
            fh.write(chunk)
        fh.write(f"ERROR token {secret} leaked; ping @someone <script>x</script> \x1b[31mred\x1b[0m\n".encode())
        fh.write(b"\xff\xfe binary \x00\x01 junk\n")
    tracemalloc.start()
    tail = redact.read_log_tail(log, r)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"read_log_tail peaked at {peak} bytes for a 50 MB log"
    assert len(tail.lines) == redact.MAX_SECTION_LINES
    text = "\n".join(tail.lines)
    assert secret not in text and "ZZZZ" not in text
    assert "@someone" not in text and "<script>" not in text and "\x1b" not in text
    assert "red" in tail.lines[-2] and "binary" in tail.lines[-1]
    assert "MB log" in tail.source


def test_read_log_tail_single_huge_line_drops_the_leading_fragment(tmp_path):
    # One 1 MB line: the read starts mid-line, maybe mid-secret, so everything
    # up to the first space goes; the rest is capped like any long line.
    secret = "PART" + "K" * 300
    log = tmp_path / "one.log"
    log.write_text(secret * 3000 + " tail words here")
    tail = redact.read_log_tail(log, Redactor(), max_bytes=64 * 1024)
    assert tail.lines == ("tail words here",)


def test_read_log_tail_missing_file_is_a_note_not_a_crash(tmp_path):
    tail = redact.read_log_tail(tmp_path / "nope.log", Redactor())
    assert tail.lines == () and "unreadable" in tail.source
