"""Exports that die or run out of space: an export and the demo cache's export, killed with SIGKILL
or writing onto a full filesystem, leave nothing half-written, and the next run works.

A full filesystem is a small tmpfs mounted in a private user + mount namespace (``unshare -rm``),
so the test needs no privileges and leaves the machine as it was.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_image_edge.runtime.manifest import MANIFEST_NAME, load_manifest

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "qwen_image_edge"]


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="needs user + mount namespaces (unshare -rm)")


def _in_namespace(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _listing(stdout: str, tag: str) -> list[str]:
    """The names printed after ``tag`` (one per line) up to the next tag line."""
    lines = stdout.splitlines()
    start = lines.index(tag) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("@@")), len(lines))
    return lines[start:end]


def _cmd(*args: str) -> str:
    return " ".join(f"'{a}'" for a in (*CLI, *args))


@needs_unshare
def test_export_onto_a_full_filesystem_leaves_nothing_and_the_next_run_works(tiny_model_dir, tmp_path):
    """A 160 KiB tmpfs cannot hold the tiny VAE decoder's graph: the export stops with one line, exit 2,
    and the filesystem is empty again (no staging folder, no lock file, no partial graph); with room
    made, the same command writes a complete export."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    export = _cmd("export", "--model", str(tiny_model_dir), "--out", f"{mnt}/exp", "--graphs", "vae_decoder")
    script = (f"mount -t tmpfs -o size=160k tmpfs {mnt} && {export}; echo @@rc=$?; ls -A {mnt}; echo @@again; "
              f"mount -o remount,size=64m {mnt} && {export} >/dev/null; echo @@rc2=$?; ls -A {mnt}; echo @@end")
    proc = _in_namespace(script)
    out = proc.stdout
    assert "@@rc=2" in out.splitlines(), (out, proc.stderr)
    assert _listing(out, "@@rc=2") == [], "a failed export left files behind"
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("qwen-image-edge: error:")]
    assert len(err) == 1 and ("No space left" in err[0] or "ENOSPC" in err[0] or "space" in err[0]), proc.stderr
    assert "@@rc2=0" in out.splitlines(), (out, proc.stderr)
    assert _listing(out, "@@rc2=0") == ["exp"]


@needs_unshare
def test_demo_cache_onto_a_full_filesystem_leaves_nothing_and_the_next_run_works(tmp_path):
    """The demo command's cached export on a 1 MiB tmpfs (the demo graphs need ~40 MB): one line, exit 2,
    the cache holds nothing half-written; with room, ``demo`` exports and generates."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    demo = _cmd("demo", "a red circle on the left on a white background", "-o", f"{tmp_path}/demo.png",
                "--steps", "2", "--seed", "0", "--threads", "1")
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && {demo}; echo @@rc=$?; find {mnt} -mindepth 1; echo @@again; "
              f"mount -o remount,size=256m {mnt} && {demo} >/dev/null; echo @@rc2=$?; echo @@end")
    proc = _in_namespace(script, env={"QWEN_IMAGE_EDGE_CACHE": str(mnt / "cache")})
    out = proc.stdout
    assert "@@rc=2" in out.splitlines(), (out, proc.stderr)
    left = _listing(out, "@@rc=2")
    assert all(Path(p) in (mnt / "cache", mnt) for p in left), f"half-written cache entries: {left}"
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("qwen-image-edge: error:")]
    assert len(err) == 1, proc.stderr
    assert "@@rc2=0" in out.splitlines(), (out, proc.stderr)
    assert (tmp_path / "demo.png").is_file()


def test_killed_demo_cache_export_is_redone_and_swept(tmp_path):
    """SIGKILL while ``demo`` exports into its cache: no manifest is left (so no export that looks
    valid), and the next ``demo`` exports afresh, generates, and sweeps the killed staging folder."""
    cache = tmp_path / "cache"
    env = {**os.environ, "QWEN_IMAGE_EDGE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    argv = [*CLI, "demo", "a red circle on the left on a white background", "-o", str(tmp_path / "d.png"),
            "--steps", "2", "--seed", "0", "--threads", "1"]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (cache.exists() and any(cache.rglob("model.onnx"))):  # a first graph is staged
            assert proc.poll() is None, "demo ended before its export wrote a graph"
            assert time.monotonic() < deadline, "demo did not start exporting in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list(cache.rglob(MANIFEST_NAME)), "a killed export left a manifest"
    staged = [p for p in cache.rglob("*") if ".tmp-" in p.name and p.is_dir()]
    assert staged, "the kill came after the export: nothing was tested"
    assert not (tmp_path / "d.png").exists()
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "d.png").is_file()
    [manifest] = list(cache.rglob(MANIFEST_NAME))
    load_manifest(manifest.parent)  # complete and verified
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name], "the killed staging was not swept"
