import os

import pytest
import torch


def pytest_configure(config):
    # pytest-xdist runs one process per core: one intra-op thread each avoids oversubscribing the CPU.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
