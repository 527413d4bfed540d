"""``python -m kvsqueeze`` runs the command line."""

import sys

from kvsqueeze.cli import main

sys.exit(main())
