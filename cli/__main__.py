"""`python -m cli ...` is `fedldm ...`."""

import sys

from cli.main import main

sys.exit(main())
