"""`python -m proxy`: the same as the `seekgate` command."""

import sys

from proxy.cli import main

sys.exit(main())
