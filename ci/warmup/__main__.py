"""``python -m ci.warmup``: the warmup CLI (``ci.warmup.run.main``)."""
import sys

from ci.warmup.run import main

sys.exit(main())
