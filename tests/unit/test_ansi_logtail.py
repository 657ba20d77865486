"""ci.text.ansi (one escape stripper for every reader) and ci.text.logtail (one reader from a log's end)."""
from __future__ import annotations

from ci.engine import crashwatch
from ci.text import ansi, logtail


def test_every_kind_of_escape_goes():
    text = ("\x1b[31mERROR\x1b[0m \x1b]8;;http://x\x07link\x1b]8;;\x07 "
            "#x1B[1mjunit#x1B[0m \x9b2Kc\x1b(B")
    assert ansi.strip(text) == "ERROR link junit c"


def test_a_coloured_crash_line_is_still_a_crash_signature(tmp_path):
    # The crash watch and the tails read through the same stripper.
    line = "\x1b[1;31mRuntimeError: CUDA error: an illegal memory access was encountered\x1b[0m"
    assert crashwatch.crash_signature(ansi.strip(line))
    log = tmp_path / "server.log"
    log.write_text("ready\n" + line + "\n")
    assert logtail.read_tail(log, 1) == ansi.strip(line)


def test_read_end_reads_only_the_end(tmp_path):
    log = tmp_path / "big.log"
    log.write_bytes(b"x" * 10_000 + b"\nlast line\n")
    data, size = logtail.read_end(log, 64)
    assert size == 10_011 and len(data) == 64 and data.endswith(b"last line\n")
    assert logtail.read_tail(tmp_path / "missing.log").startswith("<log unavailable:")
