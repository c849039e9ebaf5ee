"""``python -m qwen_image_edge.distill`` / ``torchrun --nproc-per-node N -m qwen_image_edge.distill``: see ``qwen_image_edge.distill.cli``."""

import sys

from qwen_image_edge.distill.cli import main

sys.exit(main())
