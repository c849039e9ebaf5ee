"""``python -m distill`` / ``torchrun --nproc-per-node N -m distill``: see ``distill.cli``."""

import sys

from distill.cli import main

sys.exit(main())
