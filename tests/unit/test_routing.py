"""invoke route: event (+ input) -> AMD runner pool and the GPU job matrix."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest

from ci.profiles import routing
from ci.profiles.routing import RoutingError
from ci.profiles.runners import PROFILES


@dataclass(frozen=True)
class P:
    """Just the Profile fields routing reads."""

    name: str
    vendor: str
    gpus: int
    runner_label: str
    pool: str | None = None


SMALL = {p.name: p for p in [
    P("cpu", "cpu", 0, "ubuntu-latest"),
    P("h100-2", "nvidia", 2, "linux-h100-2gpu", "h100"),
    P("mi300-1", "amd", 1, "linux-mi300-1gpu", "mi300"),
    P("mi300-8", "amd", 8, "linux-mi300-8gpu", "mi300"),
    P("mi325-8", "amd", 8, "linux-mi325-8gpu", "mi325"),
    P("mi355-8", "amd", 8, "linux-mi355-8gpu", "mi355"),
]}

ROUTE_TABLE = [
    # event, input, expected pool (or the error it must name)
    ("pull_request", None, "mi300"),
    ("pull_request", "mi325", "mi300"),  # inputs only steer a manual dispatch
    ("schedule", None, "mi325"),
    ("schedule", "", "mi325"),
    ("workflow_dispatch", "mi300", "mi300"),
    ("workflow_dispatch", "mi325", "mi325"),
    ("workflow_dispatch", " mi355 ", "mi355"),
    ("workflow_dispatch", None, RoutingError("needs an input pool, one of: mi300, mi325, mi355")),
    ("workflow_dispatch", "", RoutingError("needs an input pool")),
    ("workflow_dispatch", "h100", RoutingError("unknown runner pool 'h100'")),
    ("workflow_dispatch", "MI300", RoutingError("unknown runner pool 'MI300'")),
    ("push", None, RoutingError("no runner routing for event 'push'")),
    ("pull_request_target", None, RoutingError("no runner routing for event 'pull_request_target'")),
]


@pytest.mark.parametrize("event,pool_input,expected", ROUTE_TABLE)
def test_route_table(event, pool_input, expected):
    if isinstance(expected, RoutingError):
        with pytest.raises(RoutingError, match=re.escape(str(expected))):
            routing.route(event, pool_input, SMALL)
    else:
        assert routing.route(event, pool_input, SMALL) == expected


def test_known_pools_are_amd_pools_of_the_table():
    assert routing.known_pools(SMALL) == ("mi300", "mi325", "mi355")
    assert routing.known_pools(PROFILES) == ("mi300", "mi325")


def test_matrix_has_nvidia_and_the_routed_amd_pool_only():
    entries = routing.matrix("mi300", SMALL)
    assert [e["profile"] for e in entries] == ["h100-2", "mi300-1", "mi300-8"]
    assert entries[0] == {"profile": "h100-2", "session": "e2e-h100-2", "runner": "linux-h100-2gpu",
                          "gpus": 2, "vendor": "nvidia"}
    assert [e["profile"] for e in routing.matrix("mi325", SMALL)] == ["h100-2", "mi325-8"]


def test_outputs_for_github_output_from_the_real_runner_table():
    out = routing.outputs("schedule", None)
    assert out["pool"] == "mi325"
    matrix = json.loads(out["matrix"])
    profiles = [e["profile"] for e in matrix["include"]]
    assert "mi325-8" in profiles and not any(p.startswith("mi300") for p in profiles)
    assert "cpu" not in profiles and {"h100-4", "h200-8"} <= set(profiles)
    assert out["count"] == str(len(profiles))
    for entry in matrix["include"]:
        assert entry["runner"] == PROFILES[entry["profile"]].runner_label
        assert entry["session"] == f"e2e-{entry['profile']}"
    text = routing.format_outputs(out)
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 3
    assert lines[0] == "pool=mi325" and lines[1].startswith('matrix={"include":[')
    with pytest.raises(RoutingError, match="single lines"):
        routing.format_outputs({"x": "a\nb"})
