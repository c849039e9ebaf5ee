"""tests/fixture_cache.py: a cached artifact is reused only while the sources its build loaded and
its own files are unchanged (a mutation run must never see an artifact its patch would change)."""

from __future__ import annotations

import sys

import pytest

from tests import fixture_cache as fc


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A repository root holding one module, and a builder whose artifact depends on it."""
    root = tmp_path / "repo"
    (root / "probe_pkg").mkdir(parents=True)
    (root / "probe_pkg" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.setattr(fc, "ROOT", root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "probe_pkg", raising=False)

    def build(dest, scale="1"):
        import probe_pkg

        (dest / "v.txt").write_text(str(probe_pkg.VALUE * int(scale)))
        return dest / "v.txt"

    monkeypatch.setitem(fc.BUILDERS, "probe", build)
    entry = tmp_path / "cache" / "probe"
    fc._main(["probe", str(entry), '{"scale": "2"}'])
    return root, entry


def test_artifact_is_reused_while_its_sources_and_files_are_unchanged(probe) -> None:
    root, entry = probe
    assert fc._still_valid(entry, {"scale": "2"}) == entry / "out" / "v.txt"
    assert (entry / "out" / "v.txt").read_text() == "2"
    assert fc._still_valid(entry, {"scale": "3"}) is None  # built for other inputs


def test_a_patched_source_or_a_written_artifact_is_not_reused(probe) -> None:
    root, entry = probe
    (root / "probe_pkg" / "__init__.py").write_text("VALUE = 5\n")
    assert fc._still_valid(entry, {"scale": "2"}) is None
    (root / "probe_pkg" / "__init__.py").write_text("VALUE = 1\n")
    assert fc._still_valid(entry, {"scale": "2"}) is not None
    (entry / "out" / "extra.txt").write_text("a test wrote here")
    assert fc._still_valid(entry, {"scale": "2"}) is None


def test_without_the_cache_each_session_builds_its_own(probe, tmp_path_factory, monkeypatch) -> None:
    _, entry = probe
    monkeypatch.delenv(fc.CACHE_ENV, raising=False)
    got = fc.artifact("probe", tmp_path_factory, scale="3")
    assert got.read_text() == "3" and entry not in got.parents
    monkeypatch.setenv(fc.CACHE_ENV, str(entry.parent))  # cached for scale 2: scale 3 builds its own
    got = fc.artifact("probe", tmp_path_factory, scale="3")
    assert got.read_text() == "3" and entry not in got.parents
    assert fc.artifact("probe", tmp_path_factory, scale="2") == entry / "out" / "v.txt"
