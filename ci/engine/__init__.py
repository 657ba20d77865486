"""One real inference server: engines as specs, the launch path, its life and its crash watch.

``backends/`` holds one spec per engine (command, endpoints, every engine
fact); ``launch`` is the single pytest-free path from a server key to a
started, watched ``server.Server`` (model resolution, args, environment,
memory guard); ``crashwatch`` ends a launch at the first crash signature;
``compat`` probes what the installed engine accepts; ``keys`` spells a server's
and a topology's name with the standard library alone (the shard packer reads
them in nox's own process); ``caches`` owns the JIT
cache directories; ``models``/``tinymodel``/``realmodel`` are the models a run
serves. Several servers as one: ``gateway`` (a router process in front of
workers, ready when its own worker list calls them healthy), ``topology``
(N workers of one key, a gateway or none, started in order) and ``teardown``
(``stop_many``: all in parallel, one device-memory wait; gateways first). May import ``ci.profiles``, ``ci.install``, ``ci.host``, ``ci.text``;
never pytest, a test session, warmup or the report.
"""
