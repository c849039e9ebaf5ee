"""Peak resident memory (VmHWM) of one generation or of one graph, in a fresh process.

    python -m tests.rss_probe generate EXPORT default|low
    python -m tests.rss_probe graph EXPORT NAME FEEDS.npz

Prints one JSON line: ``baseline`` (VmHWM in kB once the runtime is imported, before any graph
opens), ``peak`` (VmHWM at the end) and what ran. The difference is what the graphs cost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("VmHWM not in /proc/self/status")


def main(argv: list[str]) -> None:
    import numpy as np

    from qwen_image_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from qwen_image_edge.runtime.manifest import load_manifest, resolve_path
    from qwen_image_edge.runtime.pipeline import Pipeline

    mode, export = argv[0], Path(argv[1])
    manifest = load_manifest(export, verify_hashes=False)  # parsed before the baseline, as a load does
    baseline = vm_hwm_kb()
    if mode == "generate":
        pipe = Pipeline.load(export, threads=1, verify_hashes=False, memory=argv[2])
        image = pipe.generate("a red circle on the left", steps=2, seed=3, output="np")
        result = {"image_sum": float(np.asarray(image, np.float64).sum())}
    else:
        name, feeds = argv[2], dict(np.load(argv[3]))
        spec = manifest.graph(name)
        session = OnnxRuntimeBackend(threads=1).open(spec, resolve_path(export, spec.file))
        session.run(feeds)
        result = {"graph": name}
    print(json.dumps({"baseline": baseline, "peak": vm_hwm_kb(), **result}))


if __name__ == "__main__":
    main(sys.argv[1:])
