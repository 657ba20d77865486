"""What names a server and a topology, and nothing else: the standard library only.

The shard packer spells server keys to group tests and reads topology labels
back from JUnit history, and it runs in nox's own process (the noxfile's
interpreter: on a runner or in the chain's container, nox and its
dependencies, no psutil, no requests). So the spelling lives here, apart from
the launch path that needs both; ``server`` and ``topology`` re-export it.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

# str(TopologyKey): "<gateway>:<policy> x<N>[ [gateway args]] <ServerKey>" or "dp x<N> <ServerKey>".
_LABEL = re.compile(r"^(?:dp|[\w.-]+:[\w.-]+) x[1-9][0-9]*(?: \[.*?\])? (?P<server>\S.*\|tp=[0-9]+\|.*)$")


@dataclass(frozen=True)
class ServerKey:
    """What makes two servers interchangeable for a test."""

    model: str
    tp: int = 1
    args: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.model}|tp={self.tp}|{shlex.join(self.args)}"


def workers_of_label(label: str) -> str | None:
    """The workers' ServerKey as a topology's label (``str(TopologyKey)``) spells it, or None for another label.

    JUnit history names a topology test's server by this label; the shard packer
    keeps such a test beside the tests of its workers' key, whose idle server
    the pool lends it as a worker instead of launching one.
    """
    m = _LABEL.match(label)
    return m.group("server") if m else None
