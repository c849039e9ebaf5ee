"""``python -m qwen_image_edge``: the same as the ``qwen-image-edge`` command."""

import sys

from qwen_image_edge.cli import main

sys.exit(main())
