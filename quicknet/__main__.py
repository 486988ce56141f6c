"""`python -m quicknet ...` is the `quicknet` command (what a GPU machine without the console script runs)."""

import sys

from quicknet.cli import main

sys.exit(main())
