"""Capability probe against the real engine (ci/engine/compat.py): its --help parse is complete."""
from __future__ import annotations

from ci.engine import compat


def test_help_probe_knows_every_flag_the_server_was_launched_with(server):
    # The server started with these flags, so the engine accepts them all; a
    # probe that misses one would drop a real flag from some future launch.
    probe = compat.FlagProbe.for_backend(server.backend, cache=compat.HelpCache(),
                                         env=dict(server.backend.env))
    launched = [a.split("=", 1)[0] for a in server.args if a.startswith("--")]
    missing = [f for f in launched if not probe.has(f)]
    print(f"{server.backend.name} {probe.version}: {len(probe.flags())} flags in --help; "
          f"launched with {launched}")
    assert not missing, f"--help parse misses flags the server accepted: {missing}"
    assert not probe.has("--kiln-no-such-flag")
