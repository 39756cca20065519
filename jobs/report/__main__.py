"""``python -m jobs.report``: (re)build a run's HTML page from its output."""

import sys

from jobs.report import main

sys.exit(main())
