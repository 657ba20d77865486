"""JIT warmup: launch every server the e2e tests declare, once, so the suite's launches are warm.

``python -m ci.warmup`` runs ``run.main``. ``specs`` reads the servers the
tests declare (by collecting them, without a session); ``key`` is the version
key a warmed cache is valid for; ``markers`` records which specs are warm.
Builds servers through ``ci.engine.launch`` like the pool does, never through
the pytest plugin: may import ``ci.engine`` and the floors below it.
"""
