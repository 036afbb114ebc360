"""``python -m deepzero_oracle.server MODULE:CALLABLE [options]``: the ``serve`` subcommand."""

import sys

from deepzero_oracle.server.cli import main

sys.exit(main())
