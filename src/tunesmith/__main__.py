"""``python -m tunesmith`` (also what ``accelerate launch -m tunesmith`` runs)."""

import sys

from tunesmith.cli import main

sys.exit(main())
