"""``python -m vlmopt`` runs the command line."""

import sys

from vlmopt.cli import main

sys.exit(main())
