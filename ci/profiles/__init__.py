"""Kinds of runner: the runner table (GPUs, engine, images, server args) and workflow routing.

``runners.PROFILES`` is the one table every other floor reads; ``routing``
decides which runners a workflow run uses (``invoke route``). Data, no
processes: may import only ``ci.host`` and ``ci.text``.
"""
