"""`python -m loadtests`: see `loadtests.cli`."""

import sys

from loadtests.cli import main

sys.exit(main())
