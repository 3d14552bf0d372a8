"""``python -m tunesmith.cli``: the command line, as ``python -m tunesmith`` runs it."""

import sys

from tunesmith.cli import main

sys.exit(main())
