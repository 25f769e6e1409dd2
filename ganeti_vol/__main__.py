"""``python -m ganeti_vol`` runs the command line."""

import sys

from ganeti_vol.cli import main

sys.exit(main())
