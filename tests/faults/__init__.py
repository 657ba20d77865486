"""Fault suites that fail on purpose, run as child pytest sessions by the tests that check their typing."""
