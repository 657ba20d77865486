"""``python -m ci.calibrate``: the calibrate CLI (``ci.calibrate.run.main``)."""
import sys

from ci.calibrate.run import main

sys.exit(main())
