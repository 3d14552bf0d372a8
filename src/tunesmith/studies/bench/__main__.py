"""``python -m tunesmith.studies.bench``: the benchmark (and its child processes)."""

import sys

from tunesmith.studies.bench.orchestrate import main

sys.exit(main())
