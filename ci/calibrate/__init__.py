"""Calibration: honest bounds for a runner kind nobody measured (``invoke calibrate``).

sglang #23156 tuned its MI300 thresholds by hand; here a runner measures
itself instead. ``run`` launches the profile's server N times through the one
launch path (``ci.engine.launch``), ``measure`` runs the lane's kits against
each (``ci.kits``: perf, accuracy, occupancy, step occupancy), ``derive``
turns each figure's spread into a bound by a named rule, and ``propose``
shows the measured table (``ci.kits.measured``) with those rows as a
reviewable diff, written only on ``--write``. ``command`` is how
``invoke calibrate`` runs it inside the profile's e2e session.

On the warmup floor: it launches servers (so not in ``kits``, which start
nothing) and uses the kits; it may import ``ci.kits``, ``ci.engine`` and the
floors below, never the session, warmup or the chain.
"""
