"""Curated mutation testing: small realistic bugs, each applied to a copy of the repository, each
run against the tests that must catch it.

A mutation is an exact text patch (``old`` occurs exactly once in ``file``, and is replaced by
``new``) plus the test ids that should fail on it. The list is in ``tests/mutations.py``. For each
mutation this script copies the repository (tracked and untracked-but-not-ignored files) into a
temporary folder once, patches one file there, runs ``pytest -x`` on the named tests in that copy,
and restores the file. A mutation is *caught* when pytest reports a failing test (exit code 1);
any other outcome (all pass, a collection error, a time-out) counts as not caught, so a mutation
that breaks the import of a test module is not taken as a catch.

Before mutating, the named tests are run once on the unmodified copy: a test that already fails
catches nothing.

    python tests/mutate.py                  # every mutation, then a table
    python tests/mutate.py --list           # the list only
    python tests/mutate.py --only calib-amax-x2 --only to-images-truncate
    python tests/mutate.py --rev HEAD       # the last commit, whatever the work tree holds

Exit code 0 when every mutation is caught, 1 otherwise. ``pytest -m mutation`` runs the same
thing one test per mutation (tests/test_mutation.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `tests.mutations` importable
    sys.path.insert(0, str(ROOT))

from tests.mutations import MUTATIONS, Mutation  # noqa: E402

# What a copy without git leaves out: the venv, caches and build output (as .gitignore does).
NOT_SOURCE = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".ruff_cache",
              ".hypothesis", "*.pyc")

# One mutation's tests must finish within this; a mutation that makes a test hang is caught by
# the time-out only if the tests say so, so a time-out counts as "not caught" and is reported.
TIMEOUT_S = 900


def copy_repository(dest: Path, root: Path = ROOT, rev: str | None = None) -> Path:
    """Copy what a checkout holds (tracked + untracked-not-ignored files) into ``dest``; with
    ``rev``, the tree of that commit instead of the work tree."""
    if rev is not None:
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=root, check=True, capture_output=True)
        subprocess.run(["tar", "-xf", "-"], cwd=dest, input=archive.stdout, check=True)
        return dest
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True,
    )
    if listing.returncode != 0:  # not a git checkout (.ci/run's working copy): the files minus build output
        shutil.copytree(root, dest, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
        return dest
    for rel in filter(None, listing.stdout.decode().split("\0")):
        src = root / rel
        target = dest / rel
        if src.is_symlink():  # a tracked link (the demo student's shared components): the link itself
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), target)
            continue
        if not src.is_file():  # deleted in the work tree but still in the index
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())
    return dest


def check_patch(mutation: Mutation, root: Path = ROOT) -> str:
    """The file's text; raises ValueError unless ``old`` occurs exactly once in it."""
    text = (root / mutation.file).read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise ValueError(f"mutation {mutation.id!r}: {mutation.file} holds its 'old' text {count} times, expected 1")
    if mutation.old == mutation.new:
        raise ValueError(f"mutation {mutation.id!r}: 'new' equals 'old'")
    return text


# Installed, runtime/ export/ calib/ distill/ are qwen_image_edge.runtime, ... (pyproject's
# package-dir); the editable install maps those names to the real checkout. This sitecustomize,
# first on PYTHONPATH, maps them to the copy instead, in pytest and in every process a test starts.
_SITECUSTOMIZE = """
import importlib.util, json, os, sys
_ROOT = os.environ["QIE_MUTATION_COPY"]
_MAPPED = json.loads(os.environ["QIE_MUTATION_PACKAGE_DIRS"])

class _CopyFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name not in _MAPPED:
            return None
        folder = os.path.join(_ROOT, _MAPPED[name])
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])

sys.meta_path.insert(0, _CopyFinder)
"""


def package_dirs(root: Path = ROOT) -> dict[str, str]:
    """pyproject's ``[tool.setuptools.package-dir]``: installed package name -> folder."""
    import tomllib

    data = tomllib.loads((root / "pyproject.toml").read_text())
    return dict(data.get("tool", {}).get("setuptools", {}).get("package-dir", {}))


def _environment(copy: Path) -> dict[str, str]:
    """The environment a run in ``copy`` sees: the copy's packages shadow the editable install."""
    env = dict(os.environ)
    boot = copy.parent / "boot"
    boot.mkdir(exist_ok=True)
    (boot / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env["QIE_MUTATION_COPY"] = str(copy)
    env["QIE_MUTATION_PACKAGE_DIRS"] = json.dumps(package_dirs(copy))
    # The copy's packages must shadow the editable install of the real checkout: put the copy first.
    env["PYTHONPATH"] = os.pathsep.join([str(boot), str(copy)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    # Mutated code must never write into the user's demo-export cache, which the real suite reuses.
    env["QWEN_IMAGE_EDGE_CACHE"] = str(copy.parent / "cache")
    # The session fixtures' artifacts, reused by every run while their sources are unpatched.
    env["QIE_FIXTURE_CACHE"] = str(copy.parent / "fixtures")
    return env


def _pytest_args(tests: Sequence[str]) -> list[str]:
    return ["-x", "-q", "-p", "no:cacheprovider", "-m", "", *tests]


def run_pytest(copy: Path, tests: Sequence[str], timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """pytest on ``tests`` inside the copy, in a fresh interpreter; (exit code, output tail).
    Exit code -1: timed out."""
    cmd = [sys.executable, "-m", "pytest", *_pytest_args(tests)]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_environment(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


# Third-party modules the tests import, slow to import (torch ~4 s, diffusers' and transformers'
# Qwen models ~5 s, modelopt ~15 s on 2 cores): imported once by the fork server below, so each
# mutation's run pays only for the project's own modules. Never a project module: those are
# imported fresh by every run, patched. (The full suite imports all of these at collection.)
PRELOAD = (
    "numpy", "torch", "safetensors.torch", "onnx", "onnx.numpy_helper", "onnxruntime", "PIL.Image", "tqdm",
    "diffusers", "diffusers.models.transformers.transformer_qwenimage21",
    "diffusers.pipelines.qwenimage21.pipeline_qwenimage21", "transformers",
    "transformers.models.qwen3_vl.modeling_qwen3_vl", "modelopt.torch.quantization",
)

# Started with the copy's environment and cwd: preloads PRELOAD, then for each request line
# (JSON: log file, pytest arguments) forks; the child runs pytest.main in its own process group
# with stdout and stderr in the log, the server answers the exit code (-1 on time-out).
_SERVER = """
import importlib, json, os, signal, sys, time
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception:
        pass
import pytest
own = sorted(m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[2]))
print(f"project modules preloaded: {own}" if own else "ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        try:
            code = int(pytest.main(req["args"]))
        except BaseException:
            code = 3
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            code = -1
            break
        time.sleep(0.05)
    print(json.dumps(code), flush=True)
"""


def _project_packages(copy: Path) -> list[str]:
    """Top-level import names the copy provides (a preloaded one would escape the mutation)."""
    names = {name.split(".")[0] for name in package_dirs(copy)}
    return sorted(names | {p.name for p in copy.iterdir() if (p / "__init__.py").is_file()})


class _ForkServer:
    """One interpreter with PRELOAD imported, forking a fresh pytest run per request."""

    def __init__(self, copy: Path) -> None:
        self._copy = copy
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, json.dumps(PRELOAD), json.dumps(_project_packages(copy))],
            cwd=copy, env=_environment(copy),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        answer = self._proc.stdout.readline().strip()
        if answer != "ready":
            self.close()
            raise RuntimeError(f"mutate: the fork server in {copy} did not start: {answer or 'no answer'}")

    def run(self, tests: Sequence[str], timeout: float = TIMEOUT_S) -> tuple[int, str]:
        log = self._copy.parent / "run.log"
        req = {"log": str(log), "args": _pytest_args(tests), "timeout": timeout}
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"mutate: the fork server in {self._copy} died (exit {self._proc.poll()})")
        code = json.loads(answer)
        out = log.read_text(errors="replace")[-3000:]
        return code, out if code != -1 else f"timed out after {timeout:.0f} s\n{out}"

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()


def failing_test(output: str) -> str:
    """The first ``FAILED <test id>`` line of pytest's short summary, or ''."""
    for line in output.splitlines():
        if line.startswith("FAILED "):
            return line.removeprefix("FAILED ").split(" - ")[0].strip()
    return ""


class Workspace:
    """One repository copy; mutations are applied to it one at a time and restored. Each run is a
    fork of one server that has the slow third-party modules imported (``fresh=True``: a new
    interpreter per run, as ``python -m pytest`` would)."""

    def __init__(self, root: Path = ROOT, rev: str | None = None, fresh: bool = False) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="qie-mutation-")
        self.path = copy_repository(Path(self._tmp.name) / "repo", root, rev)
        self._server = None if fresh else _ForkServer(self.path)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._tmp.cleanup()

    def _pytest(self, tests: Sequence[str]) -> tuple[int, str]:
        return run_pytest(self.path, tests) if self._server is None else self._server.run(tests)

    def baseline(self, tests: Iterable[str]) -> tuple[int, str]:
        return self._pytest(sorted(set(tests)))

    def run(self, mutation: Mutation) -> tuple[bool, str, str]:
        """(caught, failing test id, output tail) for one mutation."""
        target = self.path / mutation.file
        original = check_patch(mutation, self.path)
        target.write_text(original.replace(mutation.old, mutation.new))
        try:
            code, out = self._pytest(mutation.tests)
        finally:
            target.write_text(original)
        return code == 1, failing_test(out) if code == 1 else "", out


def select(only: Sequence[str] | None) -> list[Mutation]:
    if not only:
        return list(MUTATIONS)
    known = {m.id: m for m in MUTATIONS}
    unknown = [o for o in only if o not in known]
    if unknown:
        raise SystemExit(f"mutate: unknown mutation id(s) {unknown}; see --list")
    return [known[o] for o in only]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="tests/mutate.py")
    parser.add_argument("--only", action="append", metavar="ID", help="run this mutation only (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the mutations and their tests, run nothing")
    parser.add_argument("--rev", metavar="COMMIT", help="mutate this commit's tree (default: the work tree)")
    parser.add_argument("--fresh", action="store_true",
                        help="a new interpreter per run instead of forks of one with the slow imports done")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the check that the named tests pass unmutated (they do in CI's suite run)")
    args = parser.parse_args(argv)
    chosen = select(args.only)
    if args.list:
        for m in chosen:
            print(f"{m.id:32s} {m.package:8s} {m.file}: {m.what}")
            for t in m.tests:
                print(f"{'':41s}{t}")
        return 0
    for m in chosen:
        check_patch(m)
    ws = Workspace(rev=args.rev, fresh=args.fresh)
    try:
        if not args.no_baseline:
            code, out = ws.baseline(t for m in chosen for t in m.tests)
            if code != 0:
                print(out, file=sys.stderr)
                print("mutate: the named tests do not pass on the unmutated copy; nothing measured", file=sys.stderr)
                return 2
        rows = []
        for m in chosen:
            start = time.monotonic()
            caught, test, out = ws.run(m)
            rows.append((m, caught, test, time.monotonic() - start))
            status = "caught" if caught else "NOT CAUGHT"
            print(f"{m.id}: {status} ({time.monotonic() - start:.0f} s) {test}", file=sys.stderr, flush=True)
            if not caught:
                print(out, file=sys.stderr)
    finally:
        ws.close()
    print("| mutation | package | what | caught by | s |\n|---|---|---|---|---|")
    for m, caught, test, secs in rows:
        print(f"| {m.id} | {m.package} | {m.what} | {test if caught else '**not caught**'} | {secs:.0f} |")
    missed = [m.id for m, caught, *_ in rows if not caught]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught" + (f"; not caught: {missed}" if missed else ""))
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
