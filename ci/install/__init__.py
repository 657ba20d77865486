"""What gets installed: a session's locked requirements, and what an engine's own Python lacks.

``locks`` and ``pipconfig`` build and read the per-session lock files and the
machine's package sources; ``wheelhouse`` and ``engine_env`` give an engine
installed elsewhere the pieces kiln needs without replacing its own;
``pinned_wheel`` fetches a wheel as data, pinned by sha256. May import
``ci.host`` and ``ci.text``.
"""
