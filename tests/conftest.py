import os

import torch

# Triton kernels run on CPU tensors under its interpreter. The flag is read when kernels are
# decorated, so it must be set before any effattn.kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import effattn
from effattn.registry import _REGISTRY


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Each test starts from the same seed; two threads match the project's CI machine."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture
def scratch_registry():
    """Backends registered inside the test are forgotten after it."""
    effattn.list_backends()  # load the built-in backends before taking the snapshot
    before = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(before)
