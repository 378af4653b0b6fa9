"""`python -m ovd ...` is the `ovd` command."""

import sys

from ovd.training.cli import main

sys.exit(main())
