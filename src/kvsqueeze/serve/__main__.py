"""``python -m kvsqueeze.serve``: the same as ``kvsqueeze serve``."""

import sys

from kvsqueeze.serve.cli import main

sys.exit(main())
