"""The sanity kits: what a test checks against a live server, over HTTP only.

Each kit takes a server-like object (base URL, backend spec, model name) and
raises ``client.KitFailure`` with a one-line cause; ``thresholds`` holds the
per-profile bounds. Kits may read engine specs (``ci.engine.backends``) and
install pinned data; they start nothing, so they never import the launch path,
a session, warmup or the report.
"""
