"""ci/images/pull.py and ci/images/docker_client.py without an engine: refs, config, backoff, classification, deadlines."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from ci.images import docker_client, pull as images

# --- image references ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, registry, path, tag, digest", [
    ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
    ("lmsysorg/sglang:v0.5.5-rocm700", "docker.io", "lmsysorg/sglang", "v0.5.5-rocm700", None),
    ("docker.io/vllm/vllm-openai:v0.11.0", "docker.io", "vllm/vllm-openai", "v0.11.0", None),
    ("127.0.0.1:5000/kiln/test:1", "127.0.0.1:5000", "kiln/test", "1", None),
    ("localhost/kiln/test", "localhost", "kiln/test", "latest", None),
    ("ghcr.io/a/b/c@sha256:" + "a" * 64, "ghcr.io", "a/b/c", None, "sha256:" + "a" * 64),
    ("r.lan:443/x:tag@sha256:" + "b" * 64, "r.lan:443", "x", "tag", "sha256:" + "b" * 64),
    ("[::1]:5000/kiln/test:2", "[::1]:5000", "kiln/test", "2", None),
])
def test_parse_ref(text, registry, path, tag, digest):
    ref = images.parse_ref(text)
    assert (ref.registry, ref.path, ref.tag, ref.digest) == (registry, path, tag, digest)


def test_ref_on_mirror_keeps_path_tag_and_digest():
    ref = images.parse_ref("lmsysorg/sglang:v1@sha256:" + "c" * 64)
    mirrored = ref.on("10.0.0.5:5000")
    assert str(mirrored) == "10.0.0.5:5000/lmsysorg/sglang:v1@sha256:" + "c" * 64
    assert mirrored.reference == "sha256:" + "c" * 64  # pinned pulls ask for the digest
    assert images.parse_ref("ubuntu").on("m:1").repository == "m:1/library/ubuntu"


@pytest.mark.parametrize("text, needle", [
    ("", "empty"),
    ("Kiln/Test:1", "bad repository"),
    ("kiln/test:bad tag", "bad tag"),
    ("kiln/test@sha256:abc", "bad digest"),
    ("kiln/test@md5:" + "a" * 32, "bad digest"),
    ("host:99999/kiln/test", "bad registry address"),
    ("kiln//test", "bad repository"),
])
def test_bad_refs_are_one_line_errors(text, needle):
    with pytest.raises(images.BadReference, match=needle) as err:
        images.parse_ref(text)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, docker_client.DockerError)


# --- configuration -----------------------------------------------------------------------------------------


def test_mirrors_explicit_first_then_env_deduplicated():
    env = {images.MIRRORS_ENV: " m2:5000, m1:5000 ,,[fd00::1]:5000"}
    assert images.mirrors_from_env(["m1:5000"], env=env) == ["m1:5000", "m2:5000", "[fd00::1]:5000"]
    assert images.mirrors_from_env(env={}) == []  # no mirror unless configured: nothing hard-coded


@pytest.mark.parametrize("bad", ["mirror", "mirror:", "mirror:0", "mirror:70000", "http://m:5000", "m:5000/path"])
def test_bad_mirror_names_the_value(bad):
    with pytest.raises(images.BadReference, match="expected HOST:PORT") as err:
        images.mirrors_from_env([bad], env={})
    assert repr(bad) in str(err.value)


def test_credentials_from_env_both_neither_or_error():
    assert images.credentials_from_env(env={}) is None
    creds = images.credentials_from_env(env={images.USER_ENV: "u", images.PASSWORD_ENV: "s3cret"})
    assert creds == images.Credentials("u", "s3cret") and "s3cret" not in repr(creds)
    assert creds.auth_config("r:1") == {"username": "u", "password": "s3cret", "serveraddress": "r:1"}
    with pytest.raises(images.BadReference, match=images.PASSWORD_ENV):
        images.credentials_from_env(env={images.USER_ENV: "u"})
    with pytest.raises(images.BadReference, match=images.USER_ENV) as err:
        images.credentials_from_env(env={images.PASSWORD_ENV: "s3cret"})
    assert "s3cret" not in str(err.value)
    named = images.credentials_from_env(env={"MY_U": "a", "MY_P": "b"}, user_var="MY_U", password_var="MY_P")
    assert named == images.Credentials("a", "b")


# --- backoff -----------------------------------------------------------------------------------------------


def test_backoff_defaults_double_from_30_s_up_to_300_s():
    b = images.Backoff()
    assert b.attempts == 6
    assert [b.ceiling(k) for k in range(6)] == [30, 60, 120, 240, 300, 300]


def test_backoff_full_jitter_draws_between_zero_and_the_ceiling():
    calls = []

    def rng(lo, hi):
        calls.append((lo, hi))
        return hi * 0.25

    b = images.Backoff(attempts=4, base_s=0.5, cap_s=1.5)
    assert [b.delay(k, rng) for k in range(3)] == [0.125, 0.25, 0.375]
    assert calls == [(0.0, 0.5), (0.0, 1.0), (0.0, 1.5)]
    real = [b.delay(5) for _ in range(200)]
    assert all(0 <= d <= 1.5 for d in real) and len(set(real)) > 100  # really random, really capped


@pytest.mark.parametrize("kw", [{"attempts": 0}, {"base_s": -1}, {"base_s": 10, "cap_s": 5}])
def test_bad_backoff_is_rejected(kw):
    with pytest.raises(images.BadReference, match="bad backoff"):
        images.Backoff(**kw)


# --- error classification and digest checks ----------------------------------------------------------------


@pytest.mark.parametrize("message, status, kind", [
    ("manifest for r/x:1 not found: manifest unknown: manifest unknown", 404, "not_found"),
    ("manifest unknown", None, "not_found"),
    ("unauthorized: authentication required", 500, "auth"),
    ('Head "http://r/v2/x/manifests/1": no basic auth credentials', 500, "auth"),
    ("login attempt to http://r/v2/ failed with status: 401 Unauthorized", 500, "auth"),
    ("pull access denied for x, repository does not exist or may require 'docker login': denied: "
     "requested access to the resource is denied", 404, "auth"),
    ('Get "http://r/v2/": dial tcp r: connect: connection refused', 500, "transient"),
    ("received unexpected HTTP status: 500 Internal Server Error", 500, "transient"),
    ("toomanyrequests: You have reached your pull rate limit", 500, "transient"),
    ("net/http: request canceled (Client.Timeout exceeded while awaiting headers)", 500, "transient"),
])
def test_classify(message, status, kind):
    assert images.classify(message, status) == kind


def test_check_digest():
    good = "sha256:" + "1" * 64
    images.check_digest(["r:1/kiln/test@" + good, "m:2/kiln/test@sha256:" + "2" * 64], good)
    with pytest.raises(images.DigestMismatch, match="does not match pinned"):
        images.check_digest(["r:1/kiln/test@sha256:" + "2" * 64], good)
    with pytest.raises(images.DigestMismatch, match="digest none"):
        images.check_digest([], good)


def test_pull_result_summary_is_one_line():
    r = images.PullResult("r:1/k/t:1", "sha256:" + "f" * 64, "mirror", "m:5000", None, 1, 0.42)
    assert r.summary() == "pulled r:1/k/t:1 from mirror m:5000 in 0.4 s (1 attempt), id sha256:ffffffffffff"


# --- the mirror probe against real local sockets ----------------------------------------------------------

FAST_PROBE = images.PullPolicy(probe_connect_s=0.2, probe_read_s=0.3)


def test_probe_refused_port_is_unreachable_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        t0 = time.monotonic()
        failure = images.probe(f"127.0.0.1:{s.getsockname()[1]}", FAST_PROBE)
    assert failure.kind == "unreachable" and "refused" in str(failure)
    assert time.monotonic() - t0 < 0.5


def test_probe_ignores_proxy_settings(monkeypatch):
    # Through a proxy a dead mirror looks alive (the proxy answers for it).
    with socket.socket() as proxy, socket.socket() as dead:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(4)  # a proxy that never answers: if used, the probe would time out
        dead.bind(("127.0.0.1", 0))
        for var in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.getsockname()[1]}")
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        failure = images.probe(f"127.0.0.1:{dead.getsockname()[1]}", FAST_PROBE)
    assert failure.kind == "unreachable" and "refused" in str(failure)


def test_probe_silent_server_is_cut_by_the_read_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)  # the kernel completes the handshake; nobody ever answers
        t0 = time.monotonic()
        failure = images.probe(f"127.0.0.1:{s.getsockname()[1]}", FAST_PROBE)
        elapsed = time.monotonic() - t0
    assert failure.kind == "unreachable" and "no answer within 0.3 s" in str(failure)
    assert 0.3 <= elapsed < 1.5


def _serve_status(status: int):
    """A one-shot HTTP server answering ``status``; returns (address, thread)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def answer():
        conn, _ = srv.accept()
        with conn, srv:
            conn.recv(65536)
            conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    return f"127.0.0.1:{srv.getsockname()[1]}", t


@pytest.mark.parametrize("status, expected", [(200, None), (401, None), (400, None), (503, "transient")])
def test_probe_classifies_http_answers(status, expected):
    address, t = _serve_status(status)
    failure = images.probe(address, FAST_PROBE)
    t.join(2)
    assert (failure.kind if failure else None) == expected


# --- daemon absent / unreachable: one clear line --------------------------------------------------------


def test_absent_daemon_is_one_clear_line(tmp_path):
    with pytest.raises(docker_client.DockerUnavailable) as err:
        docker_client.connect(f"unix://{tmp_path}/absent.sock", timeout=2)
    message = str(err.value)
    assert "\n" not in message and "absent.sock" in message and "does not exist" in message


def test_stale_socket_is_one_clear_line(tmp_path):
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening: a daemon that died and left its socket
        with pytest.raises(docker_client.DockerUnavailable, match="refused"):
            docker_client.connect(f"unix://{path}", timeout=2)


def test_hung_daemon_is_cut_by_the_deadline(tmp_path):
    path = tmp_path / "hung.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(8)  # accepted by the kernel, never answered
        t0 = time.monotonic()
        with pytest.raises(docker_client.DockerUnavailable, match="no answer"):
            docker_client.connect(f"unix://{path}", timeout=1)
        assert time.monotonic() - t0 < 5


def test_docker_host_from_env_is_used_and_named(tmp_path):
    url = f"unix://{tmp_path}/from-env.sock"
    assert docker_client.daemon_address(env={"DOCKER_HOST": url}) == url
    assert docker_client.daemon_address(env={}) == docker_client.DEFAULT_SOCKET
    with pytest.raises(docker_client.DockerUnavailable, match="from-env.sock"):
        docker_client.connect(env={"DOCKER_HOST": url}, timeout=2)
