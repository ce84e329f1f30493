"""``python -m tfcompress``: the same command line as ``tfcompress``."""

import sys

from tfcompress.cli import main

sys.exit(main())
