"""``python -m criticality …``: the same as the ``criticality`` command."""

import sys

from criticality.cli import main

sys.exit(main())
