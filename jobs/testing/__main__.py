"""``python -m jobs.testing FAULTS_JSON [jobs.score flags...]``: jobs.score's command line with planted faults."""

import sys

from jobs.testing.faults import main

sys.exit(main())
