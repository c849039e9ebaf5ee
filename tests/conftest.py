"""Session-wide tiny model and export, built once and shared read-only by the test files
(tests/fixture_cache.py builds them; a mutation run reuses them across its sessions).

Tests that change a model folder or an export work on their own copy (``shutil.copytree``).
"""

from __future__ import annotations

import pytest

# Every test id this session collected, before -m deselects any (tests/test_mutation.py checks the
# mutation list's test ids against it instead of collecting them again in a subprocess).
COLLECTED = pytest.StashKey[frozenset]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    config.stash[COLLECTED] = frozenset(item.nodeid for item in items)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen-Image-2.1 model folder (tests/tiny_model.py), diffusers layout."""
    from tests.fixture_cache import artifact

    return artifact("tiny-model", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tmp_path_factory):
    """``(model folder, export dir)``: every graph of the tiny model, sizes up to 128 px."""
    from tests.fixture_cache import artifact

    return tiny_model_dir, artifact("tiny-export", tmp_path_factory, model=str(tiny_model_dir))


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory):
    """Every graph of the shipped demo model, exported once per session (sizes up to 256 px)."""
    from tests.fixture_cache import artifact

    return artifact("demo-export", tmp_path_factory)


@pytest.fixture(scope="session")
def demo_default_export(tmp_path_factory):
    """The demo model exported with default options, as ``qwen-image-edge export --model demo`` does
    (every graph; sizes from the model's output resolution, 128 px)."""
    from tests.fixture_cache import artifact

    return artifact("demo-default", tmp_path_factory)


@pytest.fixture(scope="session")
def exported(tiny_export):
    """``(model folder, export dir)`` of the tiny model (a test module may override it)."""
    return tiny_export


@pytest.fixture(scope="session")
def runtime_pipe(tiny_export):
    """The torch-free runtime over the tiny export (thread-safe, shared)."""
    from qwen_image_edge.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_export[1], threads=1)


@pytest.fixture(scope="session")
def reference(tiny_export):
    """The torch reference pipeline of the tiny model (shared; tests must not change it)."""
    from qwen_image2_ref.model_folder import load_pipeline

    return load_pipeline(tiny_export[0])


@pytest.fixture
def trt(monkeypatch):
    """tests/trt_standin.py installed as ``tensorrt`` (and its CUDA runtime) for one test."""
    import sys

    from qwen_image_edge.runtime.backends import cuda
    from tests import trt_standin as standin

    standin.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", standin)
    cuda.set_cudart(standin.CUDART)
    yield standin
    cuda.set_cudart(None)
