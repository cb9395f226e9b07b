"""``python -m stalwart.cli`` runs the ``stalwart`` command."""

import sys

from stalwart.cli import main

sys.exit(main())
