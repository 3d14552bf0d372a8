"""``python -m tunesmith.bench``: the benchmark (and its child processes)."""

import sys

from tunesmith.bench.orchestrate import main

sys.exit(main())
