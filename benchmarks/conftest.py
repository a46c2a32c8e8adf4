import pytest
import torch

from benchmarks.settings import THREADS


@pytest.fixture(autouse=True)
def _pinned_threads():
    """The thread count is pinned (and recorded in extra_info) for every benchmark."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    yield
