"""The curated mutation list (tests/mutations.py) stays applicable, and, under ``-m mutation``,
every mutation on it is caught by the tests it names (tests/mutate.py does the work)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import mutate
from tests.conftest import COLLECTED
from tests.mutations import MUTATIONS

PACKAGES = {"runtime", "reference", "export", "calib", "distill", "cli", "tests"}


def test_the_list_is_large_and_covers_every_package() -> None:
    assert len(MUTATIONS) >= 20
    assert len({m.id for m in MUTATIONS}) == len(MUTATIONS)
    assert {m.package for m in MUTATIONS} >= PACKAGES - {"tests"}
    assert {m.package for m in MUTATIONS} <= PACKAGES


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.id)
def test_each_patch_applies_exactly_once(mutation) -> None:
    mutate.check_patch(mutation)


def _collected(test: str, ids: frozenset) -> bool:
    """``test`` (a file, a function or one parametrized case) names at least one collected id."""
    return test in ids or any(i.startswith((test + "::", test + "[")) for i in ids)


def test_each_named_test_exists(request) -> None:
    """Checked against this session's collection; ids it did not collect (a run of some files
    only) are collected in a subprocess, which fails on an id that names nothing."""
    ids = request.config.stash.get(COLLECTED, frozenset())
    tests = sorted({t for m in MUTATIONS for t in m.tests if not _collected(t, ids)})
    if not tests:
        return
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "", *tests], cwd=mutate.ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_failing_test_reads_pytest_summary() -> None:
    out = "....\n=== short test summary info ===\nFAILED tests/test_a.py::test_b[x] - AssertionError: no\n1 failed"
    assert mutate.failing_test(out) == "tests/test_a.py::test_b[x]"
    assert mutate.failing_test("3 passed") == ""


@pytest.fixture(scope="module")
def workspace():
    ws = mutate.Workspace()
    code, out = ws.baseline(t for m in MUTATIONS for t in m.tests)
    if code != 0:
        ws.close()
        pytest.fail(f"the named tests fail on the unmutated copy:\n{out}")
    yield ws
    ws.close()


@pytest.mark.mutation
@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.id)
def test_mutation_is_caught(workspace, mutation) -> None:
    caught, test, out = workspace.run(mutation)
    assert caught, f"{mutation.id} ({mutation.file}: {mutation.what}) was not caught by {mutation.tests}:\n{out}"


def test_readme_states_the_list_size() -> None:
    text = (mutate.ROOT / "README.md").read_text()
    assert f"`tests/mutations.py` lists {len(MUTATIONS)} small realistic bugs" in text


def test_copy_without_git_leaves_out_build_output(tmp_path) -> None:
    """.ci/run's working copy has no .git: the copy falls back to the files minus venv and caches."""
    src = tmp_path / "src"
    for rel in ("runtime/schedule.py", ".venv/bin/python", "runtime/__pycache__/x.pyc", "a.egg-info/PKG-INFO"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    dest = mutate.copy_repository(tmp_path / "dest", src)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == ["runtime/schedule.py"]
