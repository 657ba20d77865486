"""kiln's harness code, one package per noun; imports flow one way, down this list.

- ``chain``    ``invoke ci``: pull -> start -> warmup -> e2e -> report -> stop, in containers.
- ``session/`` the pytest side of an e2e session: the plugin, the server pool, sharding.
- ``warmup/``  JIT warmup: launch every declared server once so the suite starts warm.
- ``calibrate/`` ``invoke calibrate``: measure a runner kind, propose its bounds as a diff.
- ``kits/``    the sanity kits a test runs against a live server (talks HTTP only).
- ``report/``  a red run explains itself: reads JUnit and logs, writes Markdown.
- ``images/``  engine images and containers: pulls with mirror fallback, devices, logs.
- ``engine/``  one real inference server: backends as specs, the launch path, crash watch.
- ``profiles/`` the runner table (what a kind of runner has) and workflow routing.
- ``install/`` what a session or an engine's own Python gets installed: locks, wheels.
- ``host/``    the machine: process containment, ports, GPUs and their memory, RDMA.
- ``text/``    text helpers every floor uses: ANSI stripping, log tails, redaction.

A profile (``profiles``) picks a nox session; the session's pytest loads the
plugin (``session``), whose pool starts servers (``engine``) the kits
(``kits``) test; the report (``report``) reads what they left. Warmup and
calibrate share a floor: both launch servers, neither imports the other. The
floors are an import-linter ``layers`` contract in pyproject.toml (``nox -s lint``).
"""
