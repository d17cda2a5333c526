"""Shared test set-up: CPU device, deterministic seeds, and a fixture per execution mode."""
import os
import shutil
import tempfile

import mindspore as ms
import numpy as np
import pytest

ms.set_device("CPU")


@pytest.fixture(params=["graph", "pynative"])
def mode(request):
    """Run the test in GRAPH_MODE and in PYNATIVE_MODE, restoring the previous mode afterwards."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=previous)


@pytest.fixture(autouse=True)
def _seed():
    ms.set_seed(0)
    np.random.seed(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


_CACHE = tempfile.mkdtemp(prefix="vit_ms_test_cache_")


def _make_torchvision_importable():
    """Let timm (a test reference) import torchvision next to the CPU-only torch wheel.

    `pip install torch==2.13.0` takes the local `+cpu` wheel, while timm's dependency torchvision 0.28.0
    comes from PyPI, built against CUDA torch: its C extension does not load (libc10_cuda.so is missing),
    which torchvision tolerates everywhere except two unguarded fake-kernel registrations for
    `torchvision::nms` / `qnms` in `_meta_registrations.py`, so `import torchvision` (and timm) raises
    "operator torchvision::nms does not exist". Declaring those two schemas first makes the import succeed;
    the tests use no torchvision op. With a matching torchvision the first import succeeds and nothing is
    declared.
    """
    import sys

    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _make_torchvision_importable.library = library  # the declarations live as long as the Library
        import torchvision  # noqa: F401,F811


def pytest_configure(config):
    _make_torchvision_importable()
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's INFO/WARNING chatter off; errors still show
    # Compiled CPU kernels and downloaded weights go to a per-session folder, not the user's ~/.cache
    # (subprocesses started by the CLI tests inherit these too).
    os.environ["VIT_MS_HOME"] = os.path.join(_CACHE, "home")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)
