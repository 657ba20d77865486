"""Port reservation: cap, host-wide exclusivity, derived ports, clear errors."""
from __future__ import annotations

import random
import socket
import subprocess
import sys

import pytest

from ci.host import ports


@pytest.fixture(autouse=True)
def _own_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(ports.LOCK_DIR_ENV, str(tmp_path / "locks"))


def test_reserved_ports_respect_the_cap_and_fit_a_derived_port():
    got = [ports.reserve(rng=random.Random(i)) for i in range(20)]
    try:
        assert all(ports.PORT_FLOOR <= r.port <= ports.PORT_CAP for r in got)
        assert all(r.port + 10000 <= 65535 for r in got)
        assert len({r.port for r in got}) == len(got)
    finally:
        for r in got:
            r.release()


def test_two_reservations_never_share_a_port_even_with_the_same_rng_seed():
    a = ports.reserve(rng=random.Random(7))
    b = ports.reserve(rng=random.Random(7))  # same first choice: must skip the held one
    try:
        assert a.port != b.port
    finally:
        a.release()
        b.release()


def test_reservation_is_host_wide_across_processes(tmp_path):
    held = ports.reserve()
    try:
        code = (f"import ci.host.ports as p, sys\n"
                f"try:\n    p.hold({held.port})\nexcept p.PortError as e:\n    print(e); sys.exit(7)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                             env={**__import__("os").environ, ports.LOCK_DIR_ENV: str(ports.lock_dir())})
        assert out.returncode == 7, out.stderr
        assert "reserved by another kiln job" in out.stdout
    finally:
        held.release()
    again = ports.hold(held.port)  # released: free again
    again.release()


def test_hold_names_the_stranger_listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        with pytest.raises(ports.PortError, match=rf"port {s.getsockname()[1]} is already in use by pid \d+"):
            ports.hold(s.getsockname()[1])
    finally:
        s.close()


def test_bad_cap_is_a_clear_error():
    with pytest.raises(ValueError, match="port cap"):
        ports.candidates(70000)


def test_wait_free_times_out_naming_the_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        with pytest.raises(ports.PortError, match="still in use"):
            ports.wait_free(port, deadline_s=0.2)
    finally:
        s.close()
    ports.wait_free(port, deadline_s=2)
