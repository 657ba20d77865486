"""A red run explains itself: JUnit and logs in, Markdown and repro commands out.

``junit`` reads results back, ``outcome`` names whose fault each failure was
(the JUnit properties the session writes), ``servers`` reads the pool's server
records, ``render`` writes the report, ``repro`` the command that reruns one
test, ``jobsummary`` and ``github`` publish it, ``flakes`` and ``quarantine``
turn a JUnit history into fail rates and a proposed quarantine, ``durations``
into the p90 per test the shards are packed by, ``matrix`` merges every shard
of a matrix into one report, ``artefacts``
names every file a session leaves under ``reports/``. It reads
records, never live servers, containers or GPUs: may import ``ci.profiles``
and ``ci.text`` only.
"""
