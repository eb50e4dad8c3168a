"""``python -m optlora ...`` is the ``optlora`` command line."""

import sys

from .cli import main

sys.exit(main())
