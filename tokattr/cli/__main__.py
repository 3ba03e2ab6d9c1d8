"""``python -m tokattr.cli``: the ``tokattr`` command (what DDP workers re-run)."""

import sys

from tokattr.cli import main

sys.exit(main())
