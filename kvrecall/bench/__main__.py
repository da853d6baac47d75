"""``python -m kvrecall.bench``."""

import sys

from kvrecall.bench.cli import main

sys.exit(main())
