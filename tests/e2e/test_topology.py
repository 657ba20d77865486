"""A gateway in front of several real engines, and data-parallel replicas, as one unit (issue 23).

The gateway is the real vllm-router wheel; the workers are the lane's engine
serving the default model. The pool launches the topology once (lending the
live server of the same key as one worker), and every test here borrows the
same one: requests through the gateway reach every worker (each worker's own
request counter), greedy answers through it equal a worker's own, the
replicas agree, and -- last, because it breaks the topology -- a worker
killed mid-run is taken out while requests keep succeeding on the rest.
"""
from __future__ import annotations

import logging
import os
import signal

import pytest

from ci.kits import topology as kit

log = logging.getLogger("kiln.e2e")

GATEWAY = pytest.mark.topology(workers=2, gateway="vllm-router", policy="round_robin")
# The data-parallel form of the same workers: no gateway, the kit balances.
REPLICAS = pytest.mark.topology(workers=2)


@GATEWAY
def test_requests_through_the_gateway_reach_every_worker(topology):
    spread = kit.check_spread(topology.gateway, topology.workers)
    log.info("per-worker request counts through %s: %s", topology.gateway.base_url,
             spread.line(topology.workers))


@GATEWAY
def test_answers_through_the_gateway_equal_a_workers_own(topology):
    # Each request is asked once per worker in a row: round robin answers it from each.
    kit.check_same_answers(topology.gateway, topology.workers[0], repeat=len(topology.workers))


@REPLICAS
def test_data_parallel_replicas_share_the_load_and_agree(topology):
    spread = kit.check_spread(None, topology.workers)
    log.info("per-replica request counts: %s", spread.line(topology.workers))
    for other in topology.workers[1:]:
        kit.check_same_answers(other, topology.workers[0])


@pytest.mark.kiln_disruptive
@GATEWAY
def test_a_killed_worker_is_taken_out_and_requests_keep_succeeding(topology):
    # A worker the topology launched itself: the one it borrowed from the pool
    # may still serve other tests' key.
    victim = topology.workers.index(topology.own_workers()[-1])
    worker = topology.workers[victim]

    def kill() -> None:
        for pid in worker.tree.member_pids():
            os.kill(pid, signal.SIGKILL)  # members of our own tree only

    out = kit.check_killed_worker_taken_out(topology.gateway, topology.workers, victim, kill)
    log.info("killed %s: %d/%d requests through the gateway succeeded; the gateway took it out "
             "after %.1f s", out.victim, out.succeeded, out.succeeded, out.taken_out_s)
