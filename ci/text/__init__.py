"""Text helpers every floor uses: ANSI escape stripping, reading a log's tail, redaction, summary sections,
yes/no environment variables (``envflag``: ``CI=false`` is false).

Pure functions over strings and files. They import nothing from kiln but each
other, so the lowest floors (``ci.host``) may use them.
"""
