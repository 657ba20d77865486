"""Decode correctness against the real engine (ci/kits/decode.py).

The CPU profile's model has random weights: these check determinism and
counts, never content.
"""
from __future__ import annotations

from ci.kits import decode


def test_greedy_is_deterministic(server):
    decode.check_greedy_deterministic(server)


def test_max_tokens_is_honoured_exactly(server):
    decode.check_max_tokens(server)


def test_batch_of_prompts_equals_single_requests(server):
    decode.check_batch_equals_singles(server)
