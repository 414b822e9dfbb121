"""`python -m proxy`: the same as the `seekgate` command."""

import sys

from proxy.cli.main import main

sys.exit(main())
