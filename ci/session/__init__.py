"""The pytest side of an e2e session: the plugin, the server pool, shards, known issues.

``pytest_plugin`` (``-p ci.session.pytest_plugin``) gives tests the ``model``
marker and the ``server`` fixture, the ``topology`` marker and fixture, backed
by ``pool``'s session-wide servers and topologies (built by ``ci.engine``); ``waits``
records in the JUnit what each borrow waited and which launches it paid for; ``envinfo`` prints what the run is on;
``shard`` splits a session across machines by the durations store (an empty
shard fails its job); ``plan`` sizes each profile's shard count from the same
store and writes the workflows' profile x shard matrix (``invoke plan``);
``known_issues`` skips by profile and runs quarantined tests as non-strict
xfails; ``skips`` fails a session whose every e2e test was skipped, counting
the reasons; ``classify`` decides whose fault a failure is (infra / engine /
test) from its evidence and ``outcomes`` records it and retries infra failures
on a fresh server.
The only package that imports pytest. May import every floor below it.
"""
