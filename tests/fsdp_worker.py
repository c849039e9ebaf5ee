"""torchrun worker of tests/test_distill_fsdp.py: several ``distill`` command lines in one launch.

    torchrun --nproc-per-node 2 tests/fsdp_worker.py '[["--teacher", ...], ...]'

Each launch costs ~15 s of imports per process on 2 cores, so the test's multi-process runs
share one: each argv list goes through ``qwen_image_edge.distill.cli.main`` in order, in the same
process group (init_distributed keeps the group a first run made).
"""

from __future__ import annotations

import json
import sys


def main(runs: list[list[str]]) -> None:
    from qwen_image_edge.distill.cli import main as distill_main

    for argv in runs:
        code = distill_main(argv)
        if code:
            raise SystemExit(f"distill {' '.join(argv)}: exit code {code}")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
