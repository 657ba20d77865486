"""A red run explains itself: JUnit and logs in, Markdown and repro commands out.

``junit`` reads results back, ``render`` writes the report, ``repro`` the
command that reruns one test, ``jobsummary`` and ``github`` publish it,
``artefacts`` names every file a session leaves under ``reports/``. It reads
records, never live servers, containers or GPUs: may import ``ci.profiles``
and ``ci.text`` only.
"""
