"""``python -m tread.cli`` (what torchrun runs)."""

import sys

from . import main

sys.exit(main())
