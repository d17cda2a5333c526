"""Shared test set-up: CPU device, deterministic seeds, and a fixture per execution mode."""
import os

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


def pytest_configure(config):
    # MindSpore's graph compiler writes kernel_meta/ and logs under the working dir by default;
    # keep tests from leaving them in the checkout.
    os.environ.setdefault("GLOG_v", "3")
