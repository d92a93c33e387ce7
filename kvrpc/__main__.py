"""``python -m kvrpc``: the same as the ``kvrpc`` command."""

import sys

from kvrpc.cli import main

sys.exit(main())
