"""API contract against the real engine (ci/kits/api.py)."""
from __future__ import annotations

import pytest

from ci.kits import api


def test_health(server):
    api.check_health(server)


def test_models_lists_the_served_model(server):
    api.check_models(server)


def test_completion(server):
    api.check_completion(server)


def test_chat(server):
    api.check_chat(server)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_streaming_is_well_formed_and_ends_in_done(server, chat):
    api.check_streaming(server, chat=chat)


def test_bad_requests_get_4xx_and_the_server_survives(server):
    api.check_bad_requests(server)
