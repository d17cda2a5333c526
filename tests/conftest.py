"""Shared test set-up: CPU device, deterministic seeds, and a fixture per execution mode."""
import os
import shutil
import tempfile

import mindspore as ms
import numpy as np
import pytest

from torch_env import make_torchvision_importable

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


def pytest_configure(config):
    make_torchvision_importable()  # timm, a test reference, imports it
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's INFO/WARNING chatter off; errors still show
    # Compiled CPU kernels and downloaded weights go to a per-session folder, not the user's ~/.cache
    # (subprocesses started by the CLI tests inherit these too).
    os.environ["VIT_MS_HOME"] = os.path.join(_CACHE, "home")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)
